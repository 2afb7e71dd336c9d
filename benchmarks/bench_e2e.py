"""End to end: request -> callback through the courier vs plain ComfyUI + upload + 3 ms.

Target (issue 7): request->callback p50 for the model-free sample workflow stays within
plain ComfyUI's request->history-entry p50 (the same graph with SaveImage, POST /prompt)
+ the p50 of one upload of the same image to the same storage + 3 ms, all in one run.

Method: one server (courier storage = the fake Supabase Storage server in peers.py, callbacks
to the receiver in peers.py, which stamps each arrival with time.monotonic()). Each
iteration runs, in random order and one at a time on an idle server:
- courier: POST /execute-workflow (model-free.json, SaveAndCallback) -> callback arrival;
- plain:   POST /prompt (the same graph with SaveImage) -> the websocket's `executing`
           node=None message, which ComfyUI sends right after task_done wrote the history
           entry;
- upload:  SupabaseStorage.put of the same 64x64 image, in the node's default format (jpeg),
           to the same storage server, from this process (the courier's own storage class).
Each request uses a new EmptyImage colour so neither graph is served from ComfyUI's cache.

    python benchmarks/bench_e2e.py [--quick] [--standin] [--iterations N]
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import BUCKET, SERVICE_KEY, use_repo_package  # noqa: E402
from client import HistoryWatcher, RawClient, submit_job, submit_prompt, unique_id  # noqa: E402
from options import BenchParser, TempDir, comfy_dir_of  # noqa: E402
from peers import start_peers  # noqa: E402
from report import print_header, table, verdict, write_json  # noqa: E402
from servers import start_server  # noqa: E402
from stats import p50, pct  # noqa: E402
from workflows import with_save_image, workflow  # noqa: E402

CLIENT_ID = "bench-e2e-plain"


async def measure(url: str, peers: Any, iterations: int, gap: float) -> dict[str, list[float]]:
    use_repo_package()
    import numpy as np

    from comfy_courier.executor.images import encode
    from comfy_courier.executor.storage.supabase_storage import SupabaseStorage

    storage = SupabaseStorage(peers.storage_url, SERVICE_KEY, BUCKET)
    base = workflow("model-free.json")
    plain_base = with_save_image(base)
    watcher = HistoryWatcher(url, CLIENT_ID)
    await watcher.start()
    client = RawClient(url)
    out: dict[str, list[float]] = {"courier": [], "plain": [], "upload": []}
    breakdown: list[dict[str, float]] = []
    seen = len(peers.callbacks())
    color = random.randrange(1 << 24)

    async def courier_once() -> None:
        nonlocal seen
        wf = json.loads(json.dumps(base))
        wf["1"]["inputs"]["color"] = next_color()
        cid = unique_id("e2e")
        t0 = time.monotonic()
        await submit_job(client, wf, cid)
        deadline = t0 + 60
        while True:
            new = peers.callbacks(seen)
            mine = [cb for cb in new if cb["cid"] == cid]
            if mine:
                seen += len(new)
                cb = mine[0]
                if cb["status"] != "success":
                    raise RuntimeError(f"courier job failed: {cb['body']}")
                out["courier"].append(cb["t"] - t0)
                breakdown.append(cb["body"].get("timings", {}))
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no callback for {cid}")
            await asyncio.sleep(0.005)

    async def plain_once() -> None:
        wf = json.loads(json.dumps(plain_base))
        wf["1"]["inputs"]["color"] = next_color()
        t0 = time.monotonic()
        done = await watcher.wait(await submit_prompt(client, wf, CLIENT_ID))
        out["plain"].append(done - t0)

    async def upload_once() -> None:
        pixels = np.full((64, 64, 3), next_color() & 0xFF, dtype=np.uint8)
        image = encode(pixels, "jpeg", 90)  # SaveAndCallback's default format and quality
        t0 = time.monotonic()
        await storage.put(f"bench/{unique_id('up')}.jpg", image.data, image.content_type)
        out["upload"].append(time.monotonic() - t0)

    def next_color() -> int:
        nonlocal color
        color = (color + 7919) % (1 << 24)
        return color

    try:
        for _ in range(3):  # warm-up: connections, the storage client, first-run costs
            for step in (courier_once, plain_once, upload_once):
                await step()
                await asyncio.sleep(gap)
        for key in out:
            out[key].clear()
        breakdown.clear()
        for _ in range(iterations):
            steps = [courier_once, plain_once, upload_once]
            random.shuffle(steps)
            for step in steps:
                await step()
                await asyncio.sleep(gap)
    finally:
        await client.close()
        await watcher.close()
        await storage.aclose()  # its HTTP session
    out["breakdown"] = breakdown  # type: ignore[assignment]
    return out


def main() -> int:
    parser = BenchParser(__doc__)
    parser.add_size("--iterations", 25, 100)
    args = parser.parse()
    comfy = comfy_dir_of(args)
    iterations = args.iterations
    facts = print_header(
        "end to end: request -> callback vs plain ComfyUI + upload + 3 ms",
        "courier p50 <= plain p50 + upload p50 + 3 ms",
        args,
    )
    with TempDir(args.keep, "bench-e2e-") as tmp:
        peers = start_peers(tmp / "peers.log")
        server = start_server(tmp / "server", comfy, peers.supabase_env())
        try:
            server.wait_up()
            res = asyncio.run(measure(server.url, peers, iterations, 0.05))
        finally:
            server.stop()
            peers.stop()
    c, p, u = res["courier"], res["plain"], res["upload"]
    budget = p50(p) + p50(u) + 0.003
    ratio = p50(c) / budget
    print(
        table(
            ["path", "p50", "p90", "n"],
            [
                [
                    "courier: POST /execute-workflow -> callback",
                    f"{p50(c) * 1000:.2f} ms",
                    f"{pct(c, 90) * 1000:.2f} ms",
                    len(c),
                ],
                [
                    "plain: POST /prompt (SaveImage) -> history",
                    f"{p50(p) * 1000:.2f} ms",
                    f"{pct(p, 90) * 1000:.2f} ms",
                    len(p),
                ],
                [
                    "upload of the same image (SupabaseStorage.put)",
                    f"{p50(u) * 1000:.2f} ms",
                    f"{pct(u, 90) * 1000:.2f} ms",
                    len(u),
                ],
                ["budget: plain + upload + 3 ms", f"{budget * 1000:.2f} ms", "", ""],
            ],
        )
    )
    bd: list[dict[str, float]] = res["breakdown"]  # type: ignore[assignment]
    if bd:
        parts = {
            k: p50([b[k] for b in bd if k in b])
            for k in ("queued_ms", "execution_ms", "upload_ms", "total_ms")
        }
        print(
            "   courier timings (callback body, p50): "
            + ", ".join(f"{k}={v:.1f}" for k, v in parts.items())
        )
        outside = [e * 1000 - b["total_ms"] for e, b in zip(c, bd, strict=True) if "total_ms" in b]
        print(
            f"   outside total_ms (the request before the job's row, then the final commit, "
            f"signing and the callback's POST), p50: {p50(outside):.2f} ms"
        )
    print(
        f"   courier - plain = {(p50(c) - p50(p)) * 1000:.2f} ms "
        f"(allowed: upload {p50(u) * 1000:.2f} ms + 3 ms)"
    )
    print(f"RESULT e2e p50 ratio to budget {ratio:.2f}x (target <= 1.00x)  {verdict(ratio <= 1.0)}")
    write_json(
        args,
        {
            "facts": facts,
            "iterations": iterations,
            "p50_ms": {
                "courier": p50(c) * 1000,
                "plain": p50(p) * 1000,
                "upload": p50(u) * 1000,
                "budget": budget * 1000,
            },
            "p90_ms": {
                "courier": pct(c, 90) * 1000,
                "plain": pct(p, 90) * 1000,
                "upload": pct(u, 90) * 1000,
            },
            "ratio": ratio,
            "breakdown": bd,
            "courier_ms": [x * 1000 for x in c],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
