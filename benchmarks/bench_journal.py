"""Journal: 100,000 finished jobs cost no resident memory and no intake speed.

Target (issue 7): with 100k finished jobs in the journal, no growth in resident memory and no
slowdown of intake, measured against an empty journal.

Method: two journals, one empty and one filled through executor.store.sqlite.journal.Journal
with the same calls a real job makes (insert, record_image, set_state running/uploading,
record_image with the URL, finish with its callback event, record_delivery), using the
txt2img sample workflow as the stored workflow. Two servers, A (empty) and B (100k), are
started one after the other (start-up time of each is reported), then measured side by side:
POST /execute-workflow one request at a time alternating A and B in random order, each
followed by GET /execute-workflow/{id} of an existing job (one of the 100k old ones on B, the
job just posted on A); then GET /courier/health on its own. RSS (VmRSS, /proc) of both
servers, each with its journal process, at ready and after the requests. Verdicts: intake
p50 B/A <= 1.05 (no slowdown beyond noise); RSS B - A <= 8 MiB (SQLite's default page
cache is 2 MiB; the rest is allocator noise between two processes). Afterwards B's journal
is pruned in the courier's batches (COURIER_RETENTION_DAYS), timing each batch (intake
waits behind at most one), with the bytes in use before and after.

    python benchmarks/bench_journal.py [--quick] [--standin] [--rows 100000]
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import use_repo_package  # noqa: E402
from client import COURIER_HEADERS, RawClient, courier_body, unique_id  # noqa: E402
from options import BenchParser, TempDir, comfy_dir_of  # noqa: E402
from peers import start_peers  # noqa: E402
from report import print_header, table, verdict, write_json  # noqa: E402
from servers import free_port, start_server  # noqa: E402
from stats import p50, pct  # noqa: E402
from workflows import workflow  # noqa: E402


def fill(path: Path, rows: int, instance: str) -> dict[str, float]:
    """`rows` finished jobs, written with the journal's own methods (one transaction each)."""
    use_repo_package()
    from comfy_courier.executor.jobs import Job, JobState, Output, callback_body
    from comfy_courier.executor.store import OutboxEvent
    from comfy_courier.executor.store.sqlite.journal import Journal

    journal = Journal(path)
    wf = json.dumps(workflow_for_fill(), sort_keys=True, separators=(",", ":"))
    t0 = time.perf_counter()
    for i in range(rows):
        now = time.time() - (rows - i)  # spread over the past, oldest first
        cid = f"old-{i:06d}"
        job = Job(
            content_request_id=cid,
            attempt=1,
            prompt_id=str(uuid.uuid4()),
            instance=instance,
            workflow=wf,
            fingerprint=f"{i:064x}",
            created_at=now,
        )
        journal.insert(job)
        output = Output(
            "9",
            0,
            f"{cid}/1-1.png",
            "image/png",
            412345,
            1080,
            1920,
            None,
            f"/output/social_{i:05}_.png",
        )
        journal.record_image(job, 1, output)
        journal.set_state(job.prompt_id, JobState.RUNNING, started_at=now + 0.01)
        journal.set_state(
            job.prompt_id, JobState.UPLOADING, executed_at=now + 1.0, expected_images=1
        )
        stored = Output(
            **{
                **output.__dict__,
                "url": f"https://project.supabase.co/storage/v1/object/public/"
                f"comfy-outputs/{cid}/1-1.png",
            }
        )
        journal.record_image(job, 1, stored)
        job.state = JobState.SUCCESS
        job.outputs = (stored,)
        job.image_urls = (stored.url or "",)
        job.started_at, job.executed_at, job.finished_at = now + 0.01, now + 1.0, now + 1.3
        body = json.dumps(callback_body(job), separators=(",", ":")).encode()
        event = OutboxEvent(f"msg_{uuid.uuid4().hex}", cid, 1, body, 0, job.finished_at)
        journal.finish(job, event)
        journal.record_delivery(event.event_id, "delivered", 1, now + 1.35)
    seconds = time.perf_counter() - t0
    journal.close()
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return {"seconds": seconds, "jobs_per_s": rows / seconds if seconds else 0.0, "bytes": size}


def prune_all(path: Path) -> dict[str, Any]:
    """Prune every job, in the batches the courier uses: how long each holds the journal,
    and the bytes in use before and after (SQLite keeps the freed pages for reuse)."""
    use_repo_package()
    from comfy_courier.executor.retention import PRUNE_BATCH
    from comfy_courier.executor.store.sqlite.journal import Journal

    journal = Journal(path)

    def used() -> int:
        pages, free, size = (
            journal._db.execute(f"PRAGMA {p}").fetchone()[0]
            for p in ("page_count", "freelist_count", "page_size")
        )
        return int((pages - free) * size)

    before = used()
    batches: list[float] = []
    pruned = 0
    t0 = time.perf_counter()
    while True:
        t1 = time.perf_counter()
        n = journal.prune(time.time(), PRUNE_BATCH)
        batches.append(time.perf_counter() - t1)
        pruned += n
        if n < PRUNE_BATCH:
            break
    seconds = time.perf_counter() - t0
    after = used()
    journal.close()
    return {
        "batch": PRUNE_BATCH,
        "batches_ms": [b * 1000 for b in batches],
        "seconds": seconds,
        "pruned": pruned,
        "bytes_before": before,
        "bytes_after": after,
    }


def workflow_for_fill() -> dict[str, Any]:
    try:
        return workflow("txt2img-sd15.json")
    except FileNotFoundError:
        return workflow("model-free.json")


async def measure(urls: dict[str, str], n: int, gap: float) -> dict[str, dict[str, list[float]]]:
    wf = workflow("model-free.json")
    clients = {k: RawClient(u) for k, u in urls.items()}
    out: dict[str, dict[str, list[float]]] = {
        k: {"intake": [], "status": [], "health": []} for k in urls
    }
    bad: list[str] = []
    last: dict[str, str] = {}
    for _ in range(n):
        order = list(urls)
        random.shuffle(order)
        for key in order:
            c = clients[key]
            t0 = time.perf_counter()
            cid = unique_id("j")
            status, raw = await c.request(
                "POST", "/execute-workflow", courier_body(wf, cid), COURIER_HEADERS
            )
            last[key] = cid
            out[key]["intake"].append(time.perf_counter() - t0)
            if status != 202:
                bad.append(f"{key}: {status} {raw[:200]!r}")
            await asyncio.sleep(gap)
            # an existing job on each: an old one among the 100k in B, a recent one in A
            old = f"old-{random.randrange(1000):06d}" if key == "B" else last[key]
            t0 = time.perf_counter()
            st, _ = await c.request("GET", f"/execute-workflow/{old}", b"", COURIER_HEADERS)
            out[key]["status"].append(time.perf_counter() - t0)
            if st != 200:
                bad.append(f"{key}: status {old} -> {st}")
            await asyncio.sleep(gap)
    # health last, on its own: with many rows it scans the outbox on the journal thread,
    # which would otherwise delay the intake samples that follow it
    for _ in range(max(5, n // 5)):
        for key, c in clients.items():
            t0 = time.perf_counter()
            await c.request("GET", "/courier/health")
            out[key]["health"].append(time.perf_counter() - t0)
            await asyncio.sleep(gap)
    for c in clients.values():
        await c.close()
    if bad:
        print("   unexpected answers:", bad[:5])
    return out


def main() -> int:
    parser = BenchParser(__doc__)
    parser.add_size("--rows", 20_000, 100_000, "finished jobs in the full journal")
    parser.add_size("--requests", 40, 200, "intake samples per server")
    args = parser.parse()
    comfy = comfy_dir_of(args)
    rows, n = args.rows, args.requests
    facts = print_header(
        f"journal: empty vs {rows:,} finished jobs",
        "intake p50 (full/empty) <= 1.05x; RSS(full) - RSS(empty) <= 8 MiB",
        args,
    )
    host = socket.gethostname()
    with TempDir(args.keep, "bench-journal-") as tmp:
        ports = {"A": free_port(), "B": free_port()}
        dbs = {"A": tmp / "A" / "courier.sqlite3", "B": tmp / "B" / "courier.sqlite3"}
        for db in dbs.values():
            db.parent.mkdir(parents=True)
        use_repo_package()
        from comfy_courier.executor.store.sqlite.journal import Journal

        Journal(dbs["A"]).close()
        filled = fill(dbs["B"], rows, f"{host}:{ports['B']}")
        print(
            f"   filled : {rows:,} jobs in {filled['seconds']:.1f} s "
            f"({filled['jobs_per_s']:.0f} jobs/s, 7 transactions each); "
            f"journal {filled['bytes'] / 2**20:.1f} MiB"
        )
        peers = start_peers(tmp / "peers.log")
        servers = {}
        try:
            for key in ("A", "B"):
                servers[key] = start_server(
                    tmp / key,
                    comfy,
                    {
                        "COURIER_DB": str(dbs[key]),
                        "COURIER_CALLBACK_URL": peers.callback_url,
                        "COURIER_MAX_QUEUE": "100000",
                    },
                    port=ports[key],
                )
                servers[key].wait_up()
            rss_ready = {k: s.rss() for k, s in servers.items()}
            asyncio.run(measure({k: s.url for k, s in servers.items()}, 10, 0.02))  # warm-up
            for s in servers.values():
                s.drain()
            rss_warm = {k: s.rss() for k, s in servers.items()}
            res = asyncio.run(measure({k: s.url for k, s in servers.items()}, n, 0.02))
            for s in servers.values():
                s.drain()
            rss_after = {k: s.rss() for k, s in servers.items()}
            up = {k: s.up_after for k, s in servers.items()}
        finally:
            for s in servers.values():
                s.stop()
            peers.stop()
        pruned = prune_all(dbs["B"])
    a, b = res["A"], res["B"]
    label = {"A": "A: empty journal", "B": f"B: {rows:,} finished jobs"}
    print(
        table(
            [
                "server",
                "start-up",
                "intake p50",
                "intake p90",
                "status p50",
                "health p50",
                "RSS ready",
                "RSS after",
                "RSS peak",
            ],
            [
                [
                    label[k],
                    f"{up[k]:.1f} s",
                    f"{p50(res[k]['intake']) * 1000:.2f} ms",
                    f"{pct(res[k]['intake'], 90) * 1000:.2f} ms",
                    f"{p50(res[k]['status']) * 1000:.2f} ms",
                    f"{p50(res[k]['health']) * 1000:.2f} ms",
                    f"{rss_ready[k]['VmRSS'] / 1024:.1f} MiB",
                    f"{rss_after[k]['VmRSS'] / 1024:.1f} MiB",
                    f"{rss_after[k]['VmHWM'] / 1024:.1f} MiB",
                ]
                for k in ("A", "B")
            ],
        )
    )
    ratio = p50(b["intake"]) / p50(a["intake"])
    rss_delta = (rss_after["B"]["VmRSS"] - rss_after["A"]["VmRSS"]) / 1024
    growth = {k: (rss_after[k]["VmRSS"] - rss_warm[k]["VmRSS"]) / 1024 for k in ("A", "B")}
    health_ratio = p50(b["health"]) / p50(a["health"])
    print(
        f"   RSS growth over {n} requests: A {growth['A']:+.1f} MiB, B {growth['B']:+.1f} MiB; "
        f"health p50 B/A {health_ratio:.2f}x"
    )
    print(
        f"RESULT journal intake p50 ratio {ratio:.2f}x (target <= 1.05x)  {verdict(ratio <= 1.05)}"
    )
    print(
        f"RESULT journal RSS delta        {rss_delta:+.1f} MiB (target <= 8 MiB)  "
        f"{verdict(rss_delta <= 8)}"
    )
    batch_ms = pruned["batches_ms"]
    print(
        f"   pruning B afterwards (the journal alone): {pruned['pruned']:,} jobs in "
        f"{len(batch_ms)} batches of {pruned['batch']} in {pruned['seconds']:.1f} s; a batch "
        f"holds the journal p50 {p50(batch_ms):.1f} ms, p99 {pct(batch_ms, 99):.1f} ms, "
        f"max {max(batch_ms):.1f} ms; in use {pruned['bytes_before'] / 2**20:.1f} -> "
        f"{pruned['bytes_after'] / 2**20:.1f} MiB "
        f"({pruned['bytes_after'] / max(1, pruned['pruned']):.0f} bytes a job kept)"
    )
    write_json(
        args,
        {
            "facts": facts,
            "prune": pruned,
            "rows": rows,
            "fill": filled,
            "requests": n,
            "startup_s": up,
            "rss_ready": rss_ready,
            "rss_warm": rss_warm,
            "rss_after": rss_after,
            "intake_ratio": ratio,
            "rss_delta_mib": rss_delta,
            "health_ratio": health_ratio,
            "p50_ms": {k: {m: p50(v) * 1000 for m, v in res[k].items()} for k in res},
            "samples_ms": {k: {m: [x * 1000 for x in v] for m, v in res[k].items()} for k in res},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
