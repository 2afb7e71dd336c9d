"""The ComfyUI stand-in (tests/standin/comfy.py) as a server process, with the courier wired
in as `wiring.setup()` wires it into ComfyUI (settings from the environment, the journal
thread, storage, deliverer, routes, start-up scheduled on the loop).

    python benchmarks/standin_server.py --port P --base DIR [--version 0.3.64|0.33.0]
        [--schedule 0,0.2,0.5]

Besides the courier's routes it serves what the benchmarks compare against, written after
ComfyUI 0.3.64's server.py: POST /prompt (trigger_on_prompt, number, validate_prompt, put),
GET /prompt (queue_remaining), GET /history/{id}, and /ws?clientId=… which, like ComfyUI's
prompt_worker, sends {"type": "executing", "data": {"node": null, "prompt_id"}} to the
prompt's client right after task_done has written the history entry. Access log off, as in
ComfyUI; INFO logging to stderr ("got prompt" like ComfyUI).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import use_repo_package  # noqa: E402

use_repo_package()

from aiohttp import web  # noqa: E402

from comfy_courier import wiring  # noqa: E402
from comfy_courier.executor.settings import Settings  # noqa: E402
from comfy_courier.routes import add_routes  # noqa: E402

from standin.comfy import StandinComfy  # noqa: E402

log = logging.getLogger("standin")


def add_comfy_routes(comfy: StandinComfy, sockets: dict[str, web.WebSocketResponse]) -> None:
    routes = comfy.routes
    queue = comfy.prompt_queue

    @routes.post("/prompt")
    async def post_prompt(request: web.Request) -> web.Response:
        log.info("got prompt")
        json_data = await request.json()
        json_data = comfy.trigger_on_prompt(json_data)
        number = comfy.number
        comfy.number += 1
        if "prompt" not in json_data:
            error = {"type": "no_prompt", "message": "No prompt provided"}
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = json_data["prompt"]
        prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
        valid = await comfy.validate_prompt(prompt_id, prompt, None)
        extra_data = json_data.get("extra_data", {})
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        if valid[0]:
            item: tuple[Any, ...] = (number, prompt_id, prompt, extra_data, valid[2])
            if comfy.version.startswith("0.33"):
                item += ({},)
            queue.put(item)
            return web.json_response(
                {"prompt_id": prompt_id, "number": number, "node_errors": valid[3]}
            )
        log.warning("invalid prompt: %s", valid[1])
        return web.json_response({"error": valid[1], "node_errors": valid[3]}, status=400)

    @routes.get("/prompt")
    async def get_prompt(request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": queue.get_tasks_remaining()}})

    @routes.post("/queue")
    async def post_queue(request: web.Request) -> web.Response:
        json_data = await request.json()
        if json_data.get("clear"):
            queue.wipe_queue()
        return web.Response(status=200)

    @routes.get("/history/{prompt_id}")
    async def history(request: web.Request) -> web.Response:
        return web.json_response(queue.get_history(prompt_id=request.match_info["prompt_id"]))

    @routes.get("/ws")
    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        sockets[sid] = ws
        try:
            await ws.send_json({"type": "status", "data": {"sid": sid}})
            async for _ in ws:
                pass
        finally:
            sockets.pop(sid, None)
        return ws

    @routes.get("/system_stats")
    async def system_stats(request: web.Request) -> web.Response:
        return web.json_response({"system": {"comfyui_version": comfy.version + "-standin"}})


def notify_after_task_done(
    comfy: StandinComfy, loop: asyncio.AbstractEventLoop, sockets: dict[str, web.WebSocketResponse]
) -> None:
    """ComfyUI's prompt_worker sends `executing` node=None to the client after task_done."""
    queue = comfy.prompt_queue
    original = queue.task_done

    def task_done(item_id: Any, history_result: Any, *args: Any, **kwargs: Any) -> Any:
        item = queue.currently_running.get(item_id)
        client_id = item[3].get("client_id") if item is not None else None
        result = original(item_id, history_result, *args, **kwargs)
        if item is not None and client_id in sockets:
            message = {"type": "executing", "data": {"node": None, "prompt_id": item[1]}}
            loop.call_soon_threadsafe(_send, sockets, client_id, message)
        return result

    queue.task_done = task_done  # type: ignore[method-assign]


def _send(sockets: dict[str, web.WebSocketResponse], sid: str, message: dict[str, Any]) -> None:
    ws = sockets.get(sid)
    if ws is not None and not ws.closed:
        asyncio.ensure_future(ws.send_json(message))


def instrument(comfy: StandinComfy) -> None:
    """--instrument: time every journal call (wall time seen by the loop, pipe and child
    included) and Courier.submit; GET /bench/instrument reports and resets."""
    import time

    from comfy_courier.executor.courier import Courier
    from comfy_courier.executor.store.sqlite.process import JournalProcess

    samples: dict[str, list[float]] = {}

    def note(name: str, seconds: float) -> None:
        samples.setdefault(name, []).append(seconds)

    original_call = JournalProcess.__call__

    async def call(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await original_call(self, fn, *args, **kwargs)
        finally:
            note(f"journal {fn.__name__}", time.perf_counter() - t0)

    original_submit = Courier.submit

    async def submit(self: Any, request: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await original_submit(self, request)
        finally:
            note("Courier.submit", time.perf_counter() - t0)

    original_snapshot = type(comfy.adapter()).queue_snapshot

    def queue_snapshot(self: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original_snapshot(self)
        finally:
            note("adapter.queue_snapshot", time.perf_counter() - t0)

    JournalProcess.__call__ = call  # type: ignore[method-assign]
    Courier.submit = submit  # type: ignore[method-assign]
    type(comfy.adapter()).queue_snapshot = queue_snapshot  # type: ignore[method-assign]

    @comfy.routes.get("/bench/instrument")
    async def report(request: web.Request) -> web.Response:
        out = {}
        for name, values in sorted(samples.items()):
            values.sort()
            out[name] = {
                "n": len(values),
                "p50_ms": values[len(values) // 2] * 1000,
                "p90_ms": values[int(len(values) * 0.9)] * 1000,
                "mean_ms": sum(values) / len(values) * 1000,
            }
        samples.clear()
        return web.json_response(out)


def fleet_probe(comfy: StandinComfy, courier: Any) -> None:
    """--probe: wall-clock times (time.time(), comparable across processes on one machine)
    of each prompt's admission commit, its put on ComfyUI's queue, and its execution start
    and end; GET /bench/probe returns them and resets. For bench_fleet.py."""
    import time

    times: dict[str, dict[str, float]] = {"committed": {}, "put": {}, "start": {}, "end": {}}
    queue = comfy.prompt_queue
    store = courier.store
    admit, put, get, task_done = store.admit, queue.put, queue.get, queue.task_done

    async def probed_admit(job: Any, then: Any, after: Any) -> Any:
        def committed(result: Any) -> Any:
            times["committed"][job.prompt_id] = time.time()
            return then(result)

        return await admit(job, committed, after)

    def probed_put(item: Any) -> Any:
        times["put"][item[1]] = time.time()
        return put(item)

    def probed_get(*args: Any, **kwargs: Any) -> Any:
        taken = get(*args, **kwargs)
        if taken is not None:
            times["start"][taken[0][1]] = time.time()
        return taken

    def probed_task_done(item_id: Any, *args: Any, **kwargs: Any) -> Any:
        item = queue.currently_running.get(item_id)
        if item is not None:
            times["end"][item[1]] = time.time()
        return task_done(item_id, *args, **kwargs)

    store.admit = probed_admit
    queue.put = probed_put  # type: ignore[method-assign]
    queue.get = probed_get  # type: ignore[method-assign]
    queue.task_done = probed_task_done  # type: ignore[method-assign]

    @comfy.routes.get("/bench/probe")
    async def report(request: web.Request) -> web.Response:
        out = {name: dict(values) for name, values in times.items()}
        for values in times.values():
            values.clear()
        return web.json_response(out)


def build_courier(
    settings: Settings, adapter: Any, loop: asyncio.AbstractEventLoop, **options: Any
) -> Any:
    """wiring.build_courier as setup() calls it (older checkouts also took the loop)."""
    import inspect

    params = inspect.signature(wiring.build_courier).parameters
    if "loop" in params:
        return wiring.build_courier(settings, adapter, loop, **options)
    return wiring.build_courier(settings, adapter, **options)


async def main(args: argparse.Namespace) -> None:
    import os

    settings = Settings.from_env(os.environ)
    comfy = StandinComfy(Path(args.base), version=args.version, port=args.port)
    adapter = comfy.adapter()
    loop = asyncio.get_running_loop()
    comfy.loop = loop
    options: dict[str, Any] = {}
    if args.schedule:  # tests: callback retries in fractions of a second, no jitter
        options = {"schedule": tuple(float(s) for s in args.schedule.split(",")), "jitter": 0.0}
    courier = build_courier(settings, adapter, loop, **options)
    wiring._runtime = wiring.Runtime(settings, adapter, courier, loop)
    add_routes(comfy.routes, lambda: courier, settings)
    if args.instrument:
        instrument(comfy)
    if args.probe:
        fleet_probe(comfy, courier)
    sockets: dict[str, web.WebSocketResponse] = {}
    add_comfy_routes(comfy, sockets)
    notify_after_task_done(comfy, loop, sockets)
    runner = web.AppRunner(comfy.make_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    comfy.start(loop)
    loop.call_soon(wiring._start, courier)  # what setup() schedules in ComfyUI
    log.info("stand-in ComfyUI %s with comfy-courier on port %s", args.version, args.port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    await stop.wait()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    comfy.stop()
    await courier.stop()
    await courier.store.aclose()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--version", default="0.3.64")
    parser.add_argument("--profile", help="cProfile the event-loop thread into this file")
    parser.add_argument(
        "--probe", action="store_true", help="time admissions, puts, starts, ends (bench_fleet)"
    )
    parser.add_argument(
        "--schedule", help="callback retry delays in seconds, comma-separated (tests)"
    )
    parser.add_argument(
        "--instrument",
        action="store_true",
        help="time journal calls and submit; GET /bench/instrument",
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main(parser.parse_args()))
