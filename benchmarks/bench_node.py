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


# -- request tracing (COURIER_BENCH_TRACE=1): time stamps along intake's path ------------
#
# perf_counter and the client's time.monotonic read the same clock (CLOCK_MONOTONIC on
# Linux), so a stamp here lines up with the client's send and receive times. The server
# loop records the request's path, the worker thread a prompt's execution (exec,
# exec_done); GET /courier-bench/trace returns the stamps and clears them.

TRACE: list[tuple[float, str]] = []


def _stamp(label: str) -> None:
    TRACE.append((time.perf_counter(), label))


def _wrap_sync(owner: Any, name: str, before: str, after: str | None = None) -> None:
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _stamp(before)
        try:
            return original(*args, **kwargs)
        finally:
            if after:
                _stamp(after)

    setattr(owner, name, wrapper)


def _wrap_async(owner: Any, name: str, before: str, after: str) -> None:
    original = getattr(owner, name)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        _stamp(before)
        try:
            return await original(*args, **kwargs)
        finally:
            _stamp(after)

    setattr(owner, name, wrapper)


def install_trace() -> None:
    import sys

    import execution
    from aiohttp import web, web_protocol
    from server import PromptServer

    # ComfyUI names a custom node package after its path (dots replaced)
    courier = next((n for n in sys.modules if n.endswith("custom_nodes/comfy_courier")), None)
    original_received = web_protocol.RequestHandler.data_received

    def data_received(self: Any, data: bytes) -> None:
        if data[:5] == b"POST ":
            _stamp("in")
        original_received(self, data)

    web_protocol.RequestHandler.data_received = data_received  # type: ignore[method-assign]
    _wrap_async(web_protocol.RequestHandler, "finish_response", "respond", "responded")
    _wrap_async(execution, "validate_prompt", "validate", "validated")
    _wrap_sync(execution.PromptQueue, "put", "put", "put_done")
    # on ComfyUI's worker thread: the prompt's execution
    _wrap_sync(execution.PromptExecutor, "execute", "exec", "exec_done")
    if courier is not None:
        import importlib

        def mod(name: str) -> Any:
            return importlib.import_module(f"{courier}.{name}")

        routes, admission = mod("routes"), mod("executor.admission")
        comfy_queue, courier_mod = mod("executor.comfy_queue"), mod("executor.courier")
        process = mod("executor.store.sqlite.process")
        _wrap_sync(routes, "parse_request", "parse", "parsed")
        _wrap_async(courier_mod.Courier, "submit", "submit", "submitted")
        _wrap_async(comfy_queue.ComfyQueue, "validated_prompt", "validate", "validated")
        _wrap_sync(process.JournalProcess, "submit", "journal_send", "journal_sent")
        _wrap_sync(process.JournalProcess, "_answer", "journal_answer")
        _wrap_sync(admission.Admission, "register", "register")

    async def trace(request: web.Request) -> web.Response:
        out = list(TRACE)
        TRACE.clear()
        return web.json_response(out)

    PromptServer.instance.routes.get("/courier-bench/trace")(trace)


# -- garbage collections (always): what stops every thread of ComfyUI at once -----------
#
# A collection runs in whichever thread allocated (ComfyUI's worker also calls gc.collect()
# itself every 10 s between prompts) and holds the GIL throughout: with ComfyUI's heap a full
# one takes hundreds of milliseconds. GET /courier-bench/gc returns those over 5 ms (start
# as time.time(), like ComfyUI's history timestamps) and clears them.

GC_PAUSES: list[dict[str, Any]] = []
_gc_started: dict[int, float] = {}


def _gc_hook(phase: str, info: dict[str, Any]) -> None:
    import threading

    thread = threading.get_ident()
    if phase == "start":
        _gc_started[thread] = time.perf_counter()
        return
    started = _gc_started.pop(thread, None)
    if started is None:
        return
    seconds = time.perf_counter() - started
    if seconds >= 0.005:
        GC_PAUSES.append(
            {
                "start": time.time() - seconds,
                "ms": seconds * 1000,
                "generation": info.get("generation"),
                "thread": threading.current_thread().name,
            }
        )


def install_gc_log() -> None:
    import gc

    from aiohttp import web
    from server import PromptServer

    gc.callbacks.append(_gc_hook)

    async def pauses(request: web.Request) -> web.Response:
        out = list(GC_PAUSES)
        GC_PAUSES.clear()
        return web.json_response(out)

    PromptServer.instance.routes.get("/courier-bench/gc")(pauses)


if __name__ == "courier_bench_node":
    import os

    install_gc_log()
    if os.environ.get("COURIER_BENCH_TRACE") == "1":
        install_trace()
