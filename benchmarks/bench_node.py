"""A second custom node the benchmarks load into a real ComfyUI next to comfy_courier.

`servers.start_server` writes `<temp>/nodes/custom_nodes/courier_bench_tools/__init__.py`,
which executes this file. It adds one node, `CourierBenchSleep` (images in, the same images
out after `seconds` of time.sleep: the GIL is free, like a GPU job), used to keep ComfyUI's
worker busy while intake is measured.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


class CourierBenchSleep:
    CATEGORY = "courier/benchmarks"
    DESCRIPTION = "Benchmark tool: sleeps, then passes the images on."
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "sleep"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "passed through"}),
                "seconds": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 3600.0,
                        "step": 0.01,
                        "tooltip": "how long to hold the worker",
                    },
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        return float("nan")

    def sleep(self, images: Any, seconds: float) -> tuple[Any]:
        time.sleep(seconds)
        return (images,)


NODE_CLASS_MAPPINGS = {"CourierBenchSleep": CourierBenchSleep}
NODE_DISPLAY_NAME_MAPPINGS = {"CourierBenchSleep": "Sleep (courier benchmarks)"}


def loader_source() -> str:
    """__init__.py of the custom node folder: runs this file and re-exports its mappings."""
    return (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('courier_bench_node', "
        f"{str(Path(__file__).resolve())!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "NODE_CLASS_MAPPINGS = mod.NODE_CLASS_MAPPINGS\n"
        "NODE_DISPLAY_NAME_MAPPINGS = mod.NODE_DISPLAY_NAME_MAPPINGS\n"
    )
