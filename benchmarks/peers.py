"""The peers a run talks to (storage and callback receiver), in a process no one measures.

A Supabase-Storage-compatible server (tests/fakes/storage_server.py, so the real `supabase`
client runs) and a callback receiver, in a process of their own so neither the client nor
the server pays for them.

`start_peers(log)` starts the process and returns a `Peers` handle; by hand:

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
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checkout import BENCH, BUCKET, SERVICE_KEY, TESTS
from client import http_json
from servers import stop_process


@dataclass
class Peers:
    """The running peers process: its URLs and its control API."""

    process: subprocess.Popen[bytes]
    storage_url: str
    control_url: str

    @property
    def callback_url(self) -> str:
        return f"{self.control_url}/callback"

    def supabase_env(self) -> dict[str, str]:
        """The courier's settings for uploading here and calling back here."""
        return {
            "COURIER_STORAGE": "supabase",
            "SUPABASE_URL": self.storage_url,
            "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
            "COURIER_CALLBACK_URL": self.callback_url,
        }

    def set_delay(self, seconds: float) -> None:
        http_json(f"{self.control_url}/delay", "POST", {"seconds": seconds})

    def callbacks(self, since: int = 0) -> list[dict[str, Any]]:
        return list(http_json(f"{self.control_url}/callbacks?since={since}")[1])

    def stats(self) -> dict[str, Any]:
        return dict(http_json(f"{self.control_url}/stats")[1])

    def stop(self) -> None:
        stop_process(self.process, 5)


def start_peers(log: Path) -> Peers:
    process = subprocess.Popen(
        [sys.executable, str(BENCH / "peers.py"), "--service-key", SERVICE_KEY, "--bucket", BUCKET],
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("READY "):
        stop_process(process, 2)
        raise RuntimeError(f"peers did not start: {line!r}; see {log}")
    info = json.loads(line[6:])
    return Peers(process, info["storage_url"], info["control_url"])


async def serve(args: argparse.Namespace) -> None:
    """The peers process itself (`python benchmarks/peers.py`): serves until SIGTERM."""
    sys.path.insert(0, str(TESTS))
    from aiohttp import web

    from fakes.storage_server import FakeStorage, start_storage_server

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
    asyncio.run(serve(parser.parse_args()))
