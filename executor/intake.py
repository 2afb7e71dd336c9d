"""Checks on an /execute-workflow request body before anything is queued.

Strict on purpose: the id becomes a storage path, and a workflow that ComfyUI's own
validator would crash on (non-dict nodes) must be a 400 here, never a 500.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest

ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
NODE_CLASS = "SaveAndCallback"
MAX_NODES = 10_000
MAX_DEPTH = 64


@dataclass(frozen=True)
class Request:
    content_request_id: str
    workflow: dict[str, Any]
    canonical: str  # the workflow as received, canonical JSON: stored, fingerprinted
    fingerprint: str


def check_id(value: Any) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise BadRequest(
            "content_request_id must be 1-128 characters of A-Z, a-z, 0-9, '_' or '-' "
            "(it becomes a storage path: no dots, slashes or colons)",
            field="content_request_id",
        )
    return value


def parse_request(raw: bytes) -> Request:
    try:
        # json.loads(raw) with these hooks would build a new decoder per call
        body = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except RecursionError as e:
        raise BadRequest("body is nested too deeply") from e
    except ValueError as e:  # bad JSON or encoding, NaN/Infinity, an int over Python's digit limit
        raise BadRequest(f"body is not valid JSON: {str(e)[:200]}") from e
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object with workflow_json and content_request_id")
    unknown = sorted(set(body) - {"workflow_json", "content_request_id"})
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}", fields=unknown)
    if "content_request_id" not in body:
        raise BadRequest("content_request_id is required", field="content_request_id")
    content_request_id = check_id(body["content_request_id"])
    workflow = body.get("workflow_json")
    check_workflow(workflow)
    assert isinstance(workflow, dict)
    canonical = json.dumps(workflow, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        fingerprint = hashlib.sha256(canonical.encode()).hexdigest()
    except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800"
        raise BadRequest(
            "workflow_json contains invalid Unicode (a lone surrogate escape)",
            field="workflow_json",
        ) from e
    return Request(content_request_id, workflow, canonical, fingerprint)


def check_workflow(workflow: Any) -> None:
    if workflow is None:
        raise BadRequest("workflow_json is required", field="workflow_json")
    if not isinstance(workflow, dict) or not workflow:
        raise BadRequest("workflow_json must be a non-empty JSON object", field="workflow_json")
    if isinstance(workflow.get("nodes"), list) and isinstance(workflow.get("links"), list):
        raise BadRequest(
            "workflow_json is in ComfyUI's UI format (it has 'nodes' and 'links' arrays); "
            "export it in API format instead (Workflow > Export (API)) and send that",
            field="workflow_json",
            hint="ui_format",
        )
    if len(workflow) > MAX_NODES:
        raise BadRequest(f"workflow_json has more than {MAX_NODES} nodes", field="workflow_json")
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise BadRequest(
                f"workflow_json node {node_id!r} must be an object with a string class_type "
                "(API format: {node_id: {class_type, inputs}})",
                field="workflow_json",
                node_id=str(node_id),
            )
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise BadRequest(
                f"workflow_json node {node_id!r}: inputs must be an object",
                field="workflow_json",
                node_id=str(node_id),
            )
        for key, value in node.items():  # inputs, and _meta etc.: copied and stored too
            if _deeper_than(value, MAX_DEPTH):
                where = "inputs" if key == "inputs" else f"field {key!r}"
                raise BadRequest(
                    f"workflow_json node {node_id!r}: {where} nested too deeply",
                    field="workflow_json",
                    node_id=str(node_id),
                )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


def _deeper_than(value: Any, limit: int) -> bool:
    """Are lists/objects nested more than `limit` levels in `value`? Stops at the first."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        container, level = stack.pop()
        if level > limit:
            return True
        for child in container.values() if isinstance(container, dict) else container:
            if isinstance(child, (dict, list)):
                stack.append((child, level + 1))
    return False


def uses_courier_node(workflow: dict[str, Any]) -> bool:
    return any(node.get("class_type") == NODE_CLASS for node in workflow.values())


def prepare_prompt(workflow: dict[str, Any], content_request_id: str) -> dict[str, Any]:
    """The prompt to run, with the id filled into every SaveAndCallback node.

    Only the dicts it changes are copied: `workflow` (as received) stays untouched, and a
    deep copy of a large graph would cost more than the rest of intake.
    """
    prompt = dict(workflow)
    for node_id, node in workflow.items():
        if node.get("class_type") == NODE_CLASS:
            inputs = {**node.get("inputs", {}), "content_request_id": content_request_id}
            prompt[node_id] = {**node, "inputs": inputs}
    return prompt
