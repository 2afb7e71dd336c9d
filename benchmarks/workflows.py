"""The graphs the benchmarks submit: the shared samples and the few they build themselves."""

from __future__ import annotations

import json
from typing import Any

from checkout import SHARED_WORKFLOWS

# /work/shared/workflows/model-free.json, embedded so a checkout without it still runs.
MODEL_FREE: dict[str, Any] = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 16753920},
        "_meta": {"title": "Empty Image (no model needed)"},
    },
    "2": {
        "class_type": "SaveAndCallback",
        "inputs": {"images": ["1", 0], "filename_prefix": "social"},
        "_meta": {"title": "Save and callback"},
    },
}


def workflow(name: str) -> dict[str, Any]:
    """A sample workflow from shared/workflows (model-free is embedded as a fallback)."""
    path = SHARED_WORKFLOWS / name
    if path.exists():
        return json.loads(path.read_text())
    if name == "model-free.json":
        return json.loads(json.dumps(MODEL_FREE))
    raise FileNotFoundError(path)


def with_save_image(wf: dict[str, Any], prefix: str | None = None) -> dict[str, Any]:
    """A copy of `wf` whose SaveAndCallback nodes are ComfyUI's SaveImage: the same graph
    without the courier. `prefix` replaces their filename_prefix (default: kept)."""
    out = json.loads(json.dumps(wf))
    for node in out.values():
        if node["class_type"] == "SaveAndCallback":
            node["class_type"] = "SaveImage"
            node["inputs"] = {
                "images": node["inputs"]["images"],
                "filename_prefix": prefix or node["inputs"].get("filename_prefix", "ComfyUI"),
            }
    return out


def blocker_workflow(seconds: float, standin: bool) -> dict[str, Any]:
    """A job that holds ComfyUI's worker for `seconds` without using the CPU."""
    sleep = "BlockingNode" if standin else "CourierBenchSleep"
    output = "PreviewImage"
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "2": {"class_type": sleep, "inputs": {"images": ["1", 0], "seconds": seconds}},
        "3": {"class_type": output, "inputs": {"images": ["2", 0]}},
    }
