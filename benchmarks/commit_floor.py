"""The durable commit at its floor: what committing one job costs, layer by layer.

A diagnostic beside bench_intake.py (no target of its own). One job at a time, --gap apart
(as the draining mode sends requests) and back to back, on a journal in a temp folder:
- a bare SQLite WAL commit of one small row (synchronous=NORMAL, the journal's settings);
- `Journal.admit` of one job in this process: the transaction intake makes;
- the same call through the journal process (`JournalProcess`, as ComfyUI runs it):
  pickling, the pipe both ways, the child's wake-up;
- a read through the journal process (`count_unfinished`): the pipe and wake-ups alone.

With --postgres, the same for the Postgres store on a throwaway loopback PostgreSQL
(tests/pgcluster.py, fsync on as a real server runs):
- one round trip (`SELECT 1`) on an async psycopg connection: the socket and the two
  wake-ups (the server's backend, then this loop);
- a bare INSERT of one row in autocommit, with `synchronous_commit` on (the server's
  default: the WAL flushed to disk before the commit returns) and off (what SQLite's
  synchronous=NORMAL promises: consistent, but the last commits may be lost if the
  database server's machine crashes);
- `PostgresStore.admit` of one job: the statement intake makes, through the store.

    python benchmarks/commit_floor.py [--quick] [--gap 0.02] [--calls N] [--postgres]
        [--json FILE]
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import use_repo_package  # noqa: E402
from options import BenchParser  # noqa: E402
from report import print_header, table, write_json  # noqa: E402
from stats import p50, pct  # noqa: E402

WORKFLOW = json.dumps(
    {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "color": 1}},
        "2": {"class_type": "SaveAndCallback", "inputs": {"images": ["1", 0]}},
    },
    sort_keys=True,
)


def timed(fn: Callable[[int], Any], calls: int, gap: float) -> list[float]:
    out = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
        if gap:
            time.sleep(gap)
    return out


async def timed_async(fn: Callable[[int], Any], calls: int, gap: float) -> list[float]:
    out = []
    for i in range(calls):
        t0 = time.perf_counter()
        await fn(i)
        out.append(time.perf_counter() - t0)
        if gap:
            await asyncio.sleep(gap)
    return out


def main() -> int:
    parser = BenchParser(__doc__)
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between calls")
    parser.add_size("--calls", 100, 300, "calls per measurement")
    parser.add_argument(
        "--postgres", action="store_true", help="also the Postgres store's floor (loopback)"
    )
    args = parser.parse()
    facts = print_header("the durable commit at its floor (diagnostic)", "none", args)
    use_repo_package()
    from comfy_courier.executor.ids import uuid7
    from comfy_courier.executor.jobs import Job
    from comfy_courier.executor.store.sqlite.journal import Journal
    from comfy_courier.executor.store.sqlite.process import JournalProcess

    def job(i: int) -> Job:
        return Job(
            content_request_id=f"floor-{os.getpid()}-{i}-{time.monotonic_ns()}",
            attempt=0,
            prompt_id=str(uuid7()),
            instance="floor",
            workflow=WORKFLOW,
            fingerprint="f" * 64,
            created_at=time.time(),
        )

    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="commit-floor-") as tmp:
        bare = sqlite3.connect(os.path.join(tmp, "bare.sqlite3"), isolation_level=None)
        bare.execute("PRAGMA journal_mode = WAL")
        bare.execute("PRAGMA synchronous = NORMAL")
        bare.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")

        def commit(i: int) -> None:
            bare.execute("BEGIN IMMEDIATE")
            bare.execute("INSERT INTO t (v) VALUES (?)", (WORKFLOW,))
            bare.execute("COMMIT")

        journal = Journal(os.path.join(tmp, "in-process.sqlite3"))
        for name, fn in (
            ("bare SQLite commit of one row", commit),
            ("Journal.admit, in this process", lambda i: journal.admit([job(i)])),
        ):
            timed(fn, 20, 0)  # warm-up
            results[name] = {
                "apart": timed(fn, args.calls, args.gap),
                "back to back": timed(fn, args.calls, 0),
            }
        journal.close()
        bare.close()

        async def through_process() -> None:
            runner = JournalProcess(os.path.join(tmp, "process.sqlite3"))
            await runner(Journal.count_unfinished)  # starts the child
            for name, call in (
                ("Journal.admit, through the journal process", Journal.admit),
                ("a read (count_unfinished) through the journal process", None),
            ):

                async def fn(i: int, call: Any = call) -> Any:
                    if call is None:
                        return await runner(Journal.count_unfinished)
                    return await runner(call, [job(i)])

                await timed_async(fn, 20, 0)
                results[name] = {
                    "apart": await timed_async(fn, args.calls, args.gap),
                    "back to back": await timed_async(fn, args.calls, 0),
                }
            await runner.aclose()

        asyncio.run(through_process())
    if args.postgres:
        postgres_floor(job, args, results)
    print(
        table(
            ["one job", f"{args.gap * 1000:.0f} ms apart: p50 (p90)", "back to back: p50"],
            [
                [
                    name,
                    f"{p50(r['apart']) * 1e6:.0f} µs ({pct(r['apart'], 90) * 1e6:.0f})",
                    f"{p50(r['back to back']) * 1e6:.0f} µs",
                ]
                for name, r in results.items()
            ],
        )
    )
    write_json(args, {"facts": facts, "gap": args.gap, "seconds": results})
    return 0


def postgres_floor(
    job: Callable[[int], Any], args: Any, results: dict[str, dict[str, list[float]]]
) -> None:
    import psycopg

    from comfy_courier.executor.store.postgres.store import PostgresStore

    from pgcluster import Cluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        print("   --postgres: no PostgreSQL server binaries (initdb, pg_ctl); skipped")
        return
    cluster = Cluster(bindir, fsync=True).start()
    url = cluster.url + "?sslmode=disable"
    unsynced = url + "&options=-c%20synchronous_commit%3Doff"

    async def measure() -> None:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        await conn.execute("CREATE TABLE t (id bigserial PRIMARY KEY, v text)")

        async def round_trip(i: int) -> None:
            await conn.execute("SELECT 1")

        async def insert(i: int) -> None:
            await conn.execute("INSERT INTO t (v) VALUES (%s)", (WORKFLOW,))

        async def synced(i: int) -> None:
            await conn.execute("SET synchronous_commit = on")

        async def unsynced_(i: int) -> None:
            await conn.execute("SET synchronous_commit = off")

        layers: list[tuple[str, Callable[[int], Any], Callable[[int], Any] | None]] = [
            ("Postgres: one round trip (SELECT 1)", round_trip, None),
            ("Postgres: INSERT one row, synchronous_commit on", insert, synced),
            ("Postgres: INSERT one row, synchronous_commit off", insert, unsynced_),
        ]
        stores = []
        for label, where in (("on", url), ("off", unsynced)):
            store = PostgresStore(where, schema=f"floor_{label}")
            stores.append(store)

            async def admit(i: int, store: PostgresStore = store) -> None:
                await store.admit(job(i), lambda answer: None, lambda answer: None)

            layers.append((f"PostgresStore.admit, synchronous_commit {label}", admit, None))
        for name, fn, setup in layers:
            if setup is not None:
                await setup(0)
            await timed_async(fn, 20, 0)
            results[name] = {
                "apart": await timed_async(fn, args.calls, args.gap),
                "back to back": await timed_async(fn, args.calls, 0),
            }
        for store in stores:
            await store.aclose()
        await conn.close()

    try:
        asyncio.run(measure())
    finally:
        cluster.remove()


if __name__ == "__main__":
    sys.exit(main())
