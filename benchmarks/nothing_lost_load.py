"""Load test of the nothing-lost invariant: thousands of jobs, a flaky callback receiver.

Runs the real courier (routes, journal, node, watcher, outbox) on the ComfyUI stand-in,
posts N jobs over HTTP, and has the receiver fail, stall and drop at random. Counts, per
accepted attempt: delivered (one webhook-id seen), duplicated (the same webhook-id seen
more than once: only allowed where an answer was late), lost (accepted, never delivered).

    python benchmarks/nothing_lost_load.py --jobs 2000
    python benchmarks/nothing_lost_load.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from comfy_courier import wiring  # noqa: E402
from comfy_courier.executor.settings import Settings  # noqa: E402
from comfy_courier.routes import add_routes  # noqa: E402

from standin.comfy import StandinComfy  # noqa: E402

API_KEY = "load-test-inbound-key-0123456789"


def workflow(i: int) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "color": i}},
        "2": {"class_type": "SaveAndCallback", "inputs": {"images": ["1", 0]}},
    }


class FlakyReceiver:
    """503 / 429 with Retry-After / answers later than the sender waits / dropped connections."""

    def __init__(self, seed: int, fail: float, slow: float, drop: float) -> None:
        self.random = random.Random(seed)
        self.fail, self.slow, self.drop = fail, slow, drop
        self.seen: dict[str, Counter[str]] = defaultdict(Counter)  # cid:attempt -> webhook-ids
        self.processed: Counter[str] = Counter()  # webhook-id -> answers the receiver 2xx-ed
        self.outcomes: Counter[str] = Counter()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        key = f"{body['content_request_id']}:{body['attempt']}"
        self.seen[key][request.headers["webhook-id"]] += 1
        roll = self.random.random()
        if roll < self.drop:
            self.outcomes["dropped"] += 1
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)
        if roll < self.drop + self.fail:
            self.outcomes["503"] += 1
            return web.Response(status=503)
        if roll < self.drop + self.fail + self.slow:
            self.outcomes["late"] += 1
            self.processed[request.headers["webhook-id"]] += 1  # processed, answered too late
            await asyncio.sleep(0.4)  # longer than the sender's 0.2 s attempt timeout
            return web.Response(status=200)
        self.outcomes["200"] += 1
        self.processed[request.headers["webhook-id"]] += 1
        return web.Response(status=200)


async def run(jobs: int, fail: float, slow: float, drop: float, seed: int) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="courier-load-"))
    receiver = FlakyReceiver(seed, fail, slow, drop)
    app = web.Application()
    app.router.add_post("/callback", receiver.handle)
    recv_server = TestServer(app, host="127.0.0.1")
    await recv_server.start_server()

    settings = Settings.from_env(
        {
            "COURIER_API_KEY": API_KEY,
            "COURIER_CALLBACK_URL": str(recv_server.make_url("/callback")),
            "COURIER_DB": str(tmp / "journal.sqlite3"),
            "COURIER_MAX_QUEUE": str(jobs + 1),
            "COURIER_PUBLIC_BASE_URL": "http://courier.test",
        }
    )
    comfy = StandinComfy(tmp / "comfy")
    adapter = comfy.adapter()
    courier = wiring.build_courier(
        settings, adapter, schedule=(0, 0.05, 0.1, 0.2), delivery_timeout=0.2, jitter=0.1
    )
    loop = asyncio.get_running_loop()
    wiring._runtime = wiring.Runtime(settings, adapter, courier, loop)
    add_routes(comfy.routes, lambda: courier, settings)
    client = TestClient(TestServer(comfy.make_app(), host="127.0.0.1"))
    await client.start_server()
    comfy.start(loop)
    await courier.start()

    started = time.perf_counter()
    statuses: Counter[int] = Counter()
    semaphore = asyncio.Semaphore(16)

    async def post(i: int) -> None:
        async with semaphore:
            resp = await client.post(
                "/execute-workflow",
                headers={"X-API-Key": API_KEY},
                json={"workflow_json": workflow(i), "content_request_id": f"load-{i}"},
            )
            statuses[resp.status] += 1
            await resp.release()

    await asyncio.gather(*(post(i) for i in range(jobs)))
    accepted = statuses[202]
    deadline = time.monotonic() + max(60.0, jobs * 0.05)
    while time.monotonic() < deadline:
        counts = await courier.health()
        if counts["queue"]["courier_unfinished"] == 0 and counts["outbox"]["pending"] == 0:
            break
        await asyncio.sleep(0.2)
    elapsed = time.perf_counter() - started

    delivered = sum(1 for ids in receiver.seen.values() if len(ids) == 1)
    events_per_attempt = Counter(len(ids) for ids in receiver.seen.values())
    duplicates = sum(n - 1 for n in receiver.processed.values() if n > 1)
    never_processed = sum(
        1 for ids in receiver.seen.values() if not any(receiver.processed[i] for i in ids)
    )
    health = await courier.health()
    result = {
        "jobs posted": jobs,
        "accepted (202)": accepted,
        "attempts with exactly one webhook-id": delivered,
        "attempts with more than one webhook-id": sum(
            n for k, n in events_per_attempt.items() if k > 1
        ),
        "lost (accepted, no callback processed)": accepted - len(receiver.seen) + never_processed,
        "duplicates (processed again after a late answer)": duplicates,
        "late answers (the only allowed cause)": receiver.outcomes["late"],
        "receiver answers": dict(receiver.outcomes),
        "outbox": health["outbox"],
        "seconds": round(elapsed, 1),
    }
    comfy.stop()
    await courier.stop()
    await client.close()
    await recv_server.close()
    await courier.store.aclose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="200 jobs")
    parser.add_argument("--fail", type=float, default=0.2, help="share of 503 answers")
    parser.add_argument("--slow", type=float, default=0.05, help="share of late answers")
    parser.add_argument("--drop", type=float, default=0.03, help="share of dropped connections")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    jobs = 200 if args.quick else args.jobs
    result = asyncio.run(run(jobs, args.fail, args.slow, args.drop, args.seed))
    for name, value in result.items():
        print(f"{name:>42}: {value}")
    ok = (
        result["lost (accepted, no callback processed)"] == 0
        and result["duplicates (processed again after a late answer)"]
        <= result["late answers (the only allowed cause)"]
        and result["attempts with more than one webhook-id"] == 0
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
