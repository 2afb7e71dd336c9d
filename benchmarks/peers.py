"""The benchmarks' loopback peers, in their own process: a Supabase-Storage-compatible server
(tests/fakes/storage_server.py, so the real `supabase` client runs) and a callback receiver.

    python benchmarks/peers.py [--service-key K] [--bucket B]

Prints one line `READY {"storage_url": ..., "control_url": ...}` once both listen, then
serves until SIGTERM. Control API (on control_url):
    POST /callback                 the callback receiver (answers 200)
    GET  /callbacks?since=N        callbacks received: [{cid, status, t, webhook_id, body}], t =
                                   time.monotonic() at arrival (system-wide clock on Linux)
    POST /delay {"seconds": s}     FakeStorage.delay_uploads = s (answer every upload s late)
    GET  /stats                    uploads and callbacks so far
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TESTS  # noqa: E402

sys.path.insert(0, str(TESTS))
from aiohttp import web  # noqa: E402

from fakes.storage_server import FakeStorage, start_storage_server  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    state = FakeStorage(service_key=args.service_key)
    state.add_bucket(args.bucket, public=True)
    storage_url, stop_storage = await start_storage_server(state)
    received: list[dict[str, Any]] = []

    async def callback(request: web.Request) -> web.Response:
        raw = await request.read()
        now = time.monotonic()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        received.append(
            {
                "cid": body.get("content_request_id"),
                "status": body.get("status"),
                "t": now,
                "webhook_id": request.headers.get("webhook-id"),
                "body": body,
            }
        )
        return web.json_response({"ok": True})

    async def callbacks(request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        return web.json_response(received[since:])

    async def delay(request: web.Request) -> web.Response:
        state.delay_uploads = float((await request.json())["seconds"])
        return web.json_response({"delay_uploads": state.delay_uploads})

    async def stats(request: web.Request) -> web.Response:
        # Keep memory flat on long runs: the benchmarks never read stored objects back.
        state.objects.clear()
        uploads = len(state.uploads)
        state.uploads.clear()
        state.requests.clear()
        return web.json_response({"uploads_since_last_stats": uploads, "callbacks": len(received)})

    app = web.Application(client_max_size=50 * 1024 * 1024)
    app.router.add_post("/callback", callback)
    app.router.add_get("/callbacks", callbacks)
    app.router.add_post("/delay", delay)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(
        "READY "
        + json.dumps({"storage_url": storage_url, "control_url": f"http://127.0.0.1:{port}"}),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await stop_storage()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--service-key", default="service-role-key")
    parser.add_argument("--bucket", default="comfy-outputs")
    asyncio.run(main(parser.parse_args()))
