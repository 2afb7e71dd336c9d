"""What ComfyUI reports, made fit to leave the host: pure functions, given what they need.

- `explain_missing_nodes`: ComfyUI's validation stops at the first unknown node type and
  reports it with `node_errors: {}` and the node's id only inside `details` (0.3.x says
  "Cannot execute because node Foo does not exist.", 0.33+ "Node 'title' not found").
  The courier's 400 names every missing type and the node that uses it, in the message
  and keyed by node id, as ComfyUI does for its other validation errors.
- `relative_paths`: an execution error's message may hold ComfyUI's own directories
  (`full_output_folder: /srv/ComfyUI/output/...`); backends show `error_message` to their
  end users, so those directories become relative (`output/...`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from functools import partial
from typing import Any

# ComfyUI's error types for an unknown class_type: 0.3.x / 0.33+
_MISSING_TYPES = ("invalid_prompt", "missing_node_type")
_DRIVE = re.compile(r"[A-Za-z]:")
_NODE_ID = re.compile(r"Node ID '#(?P<id>[^']+)'")
MISSING_HINT = "install the custom node that provides it, then restart ComfyUI"


def explain_missing_nodes(
    error: Mapping[str, Any] | None,
    prompt: Mapping[str, Any],
    known: Collection[str] | None,
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(error, node_errors) naming every node whose class_type is not installed, or None
    when `error` is not ComfyUI's unknown-node-type error.

    `known` is ComfyUI's node types; without it only the node ComfyUI named is reported.
    """
    if not error or error.get("type") not in _MISSING_TYPES:
        return None
    extra = error.get("extra_info")
    extra = dict(extra) if isinstance(extra, Mapping) else {}
    named = _NODE_ID.search(str(error.get("details") or ""))
    first = str(extra.get("node_id") or (named.group("id") if named else ""))
    if first not in prompt:
        return None  # not about one node: some other invalid prompt
    missing: dict[str, str] = {}
    for node_id, node in prompt.items():
        class_type = node.get("class_type") if isinstance(node, Mapping) else None
        if not isinstance(class_type, str):
            continue
        if (known is not None and class_type not in known) or (known is None and node_id == first):
            missing[str(node_id)] = class_type
    if not missing:
        return None
    order = sorted(missing, key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n))
    message = "; ".join(
        f"node {n}: class_type {missing[n]!r} is not installed on this ComfyUI" for n in order
    )
    explained = {
        "type": "missing_node_type",
        "message": message,
        "details": str(error.get("message") or ""),
        "extra_info": {**extra, "missing_node_types": {n: missing[n] for n in order}},
    }
    node_errors = {
        n: {
            "errors": [
                {
                    "type": "missing_node_type",
                    "message": f"class_type {missing[n]!r} is not installed on this ComfyUI",
                    "details": MISSING_HINT,
                    "extra_info": {"class_type": missing[n]},
                }
            ],
            "dependent_outputs": [],
            "class_type": missing[n],
        }
        for n in order
    }
    return explained, node_errors


def relative_paths(text: str, directories: Sequence[tuple[str, str]]) -> str:
    """`text` with each absolute directory replaced by its label, the longest first.

    `directories` pairs a path with what it becomes: `("/srv/ComfyUI/output", "output")`
    turns `/srv/ComfyUI/output/x/y.png` into `output/x/y.png`; an empty label drops the
    directory (`("/srv/ComfyUI", "")`: `/srv/ComfyUI/custom_nodes/a.py` becomes
    `custom_nodes/a.py`). A path that only starts alike (`.../output2`) is left alone.
    """
    usable = [(path.rstrip("/\\"), label) for path, label in directories]
    # never a root (`/`, `C:\\`): it would mangle every path in the text
    usable = [(path, label) for path, label in usable if path and not _DRIVE.fullmatch(path)]
    for path, label in sorted(usable, key=lambda d: len(d[0]), reverse=True):
        pattern = re.compile(re.escape(path) + r"(?:(?P<sep>[/\\])|(?![\w.-]))")
        text = pattern.sub(partial(_replacement, label=label), text)
    return text


def _replacement(match: re.Match[str], label: str) -> str:
    if match.group("sep"):
        return f"{label}/" if label else ""
    return label or "."
