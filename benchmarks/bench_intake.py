"""Intake: POST /execute-workflow against ComfyUI's own POST /prompt, same workflow, same host.

Targets (issue 7):
- p50 latency of POST /execute-workflow <= 1.0x POST /prompt's, with the job row committed to
  the journal before the answer (checked for every measured request from a second SQLite
  connection) and both validating the workflow;
- sustained requests/second with 32 concurrent clients >= 0.8x /prompt's.

Method: one server process; both endpoints get the same model-free workflow. Latency:
requests one at a time, the two endpoints interleaved in random order, with a pause after
each so the job it queued has run (both run the same graph: /prompt's SaveAndCallback runs as
a UI run) and the server is idle again. Throughput: 32 keep-alive connections sending
back-to-back for a fixed time; endpoint phases alternate (P C C P ...), each starting on an
empty queue, in two modes:
- busy worker: a job that sleeps (GIL free, like a GPU job) holds ComfyUI's worker for the
  phase, so the phase measures intake alone; the queue is cleared afterwards;
- live worker: the queued model-free jobs execute during the phase (each in milliseconds,
  so their uploads, journal writes and callbacks compete with intake).
COURIER_MAX_QUEUE is raised so no request is refused with 429; callbacks go to a receiver
in another process.

    python benchmarks/bench_intake.py [--quick] [--standin] [--json FILE] [--db postgresql://…]
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
from checkout import CALLBACK_KEY  # noqa: E402
from client import COURIER_HEADERS, JournalReader, RawClient, courier_body, prompt_body, unique_id  # noqa: E402
from options import BenchParser, TempDir, comfy_dir_of  # noqa: E402
from peers import Peers, start_peers  # noqa: E402
from report import print_header, table, verdict, write_json  # noqa: E402
from servers import Server, start_server  # noqa: E402
from stats import p50, pct  # noqa: E402
from workflows import workflow  # noqa: E402


def ui_prompt_body(wf: dict[str, Any]) -> bytes:
    """The /prompt body, saving into a folder of its own like a courier job's `<cid>/`.

    ComfyUI's save nodes list their target folder to number the next file; with one
    shared folder, tens of thousands of /prompt runs would slow ComfyUI's worker more and
    more and make /prompt look slower than it is.
    """
    nodes = {k: dict(v) for k, v in wf.items()}
    for node in nodes.values():
        if node.get("class_type") in ("SaveAndCallback", "SaveImage"):
            node["inputs"] = {**node["inputs"], "filename_prefix": f"ui/{unique_id('p')}/social"}
    return prompt_body(nodes, "bench-intake")


def start_intake_server(
    base: Path, comfy: Path | None, peers: Peers, db: dict[str, str] | None = None
) -> Server:
    """The server the intake benchmarks measure: no 429s, callbacks to the peers' receiver;
    `db` the COURIER_DB settings of a PostgreSQL store (default: the SQLite journal)."""
    return start_server(
        base,
        comfy,
        {
            "COURIER_MAX_QUEUE": "1000000",
            "COURIER_CALLBACK_URL": peers.callback_url,
            "COURIER_CALLBACK_API_KEY": CALLBACK_KEY,
            **(db or {}),
        },
    )


class PostgresReader:
    """JournalReader's check on the PostgreSQL store: a second connection, committed rows."""

    def __init__(self, url: str, schema: str) -> None:
        import psycopg

        self._db = psycopg.connect(url, autocommit=True)
        self._schema = schema

    def committed(self, prompt_id: str) -> bool:
        sql = f'SELECT 1 FROM "{self._schema}".jobs WHERE prompt_id = %s'
        return self._db.execute(sql, (prompt_id,)).fetchone() is not None

    def close(self) -> None:
        self._db.close()


async def latency_phase(
    url: str, wf: dict[str, Any], n: int, gap: float, reader: JournalReader
) -> dict[str, Any]:
    client = RawClient(url)
    lat: dict[str, list[float]] = {"prompt": [], "courier": []}
    committed = checked = 0
    bad: list[str] = []
    for _ in range(n):
        order = ["prompt", "courier"]
        random.shuffle(order)
        for kind in order:
            if kind == "prompt":
                body, path, headers, want = ui_prompt_body(wf), "/prompt", {}, 200
            else:
                body = courier_body(wf, unique_id("lat"))
                path, headers, want = "/execute-workflow", COURIER_HEADERS, 202
            t0 = time.perf_counter()
            status, raw = await client.request("POST", path, body, headers)
            lat[kind].append(time.perf_counter() - t0)
            if status != want:
                bad.append(f"{path} -> {status}: {raw[:200]!r}")
            elif kind == "courier":
                checked += 1
                committed += reader.committed(json.loads(raw)["prompt_id"])
            await asyncio.sleep(gap)
    await client.close()
    return {"lat": lat, "committed": committed, "checked": checked, "bad": bad}


async def load_phase(
    url: str, kind: str, wf: dict[str, Any], clients: int, duration: float
) -> dict[str, Any]:
    stop_at = time.perf_counter() + duration
    counts = {"ok": 0, "other": 0}
    lat: list[float] = []
    statuses: dict[int, int] = {}

    async def one_client(i: int) -> None:
        client = RawClient(url)
        try:
            while time.perf_counter() < stop_at:
                if kind == "prompt":
                    body, path, headers, want = ui_prompt_body(wf), "/prompt", {}, 200
                else:
                    body = courier_body(wf, unique_id(f"load{i}"))
                    path, headers, want = "/execute-workflow", COURIER_HEADERS, 202
                t0 = time.perf_counter()
                status, _ = await client.request("POST", path, body, headers)
                t1 = time.perf_counter()
                statuses[status] = statuses.get(status, 0) + 1
                if t1 <= stop_at:
                    lat.append(t1 - t0)
                    counts["ok" if status == want else "other"] += 1
        finally:
            await client.close()

    start = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    elapsed = min(time.perf_counter(), stop_at) - start
    return {
        "rps": counts["ok"] / elapsed,
        "ok": counts["ok"],
        "other": counts["other"],
        "statuses": statuses,
        "p50": p50(lat),
        "p99": pct(lat, 99),
    }


def main() -> int:
    parser = BenchParser(__doc__)
    parser.add_size("--requests", 40, 300, "latency samples per endpoint")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_size("--duration", 2.0, 5.0, "seconds per throughput phase")
    parser.add_size("--rounds", 1, 2, "throughput phases per endpoint and mode")
    parser.add_argument(
        "--db",
        help="postgresql://…: measure the courier on this PostgreSQL (a fresh schema; "
        "ComfyUI's Python needs psycopg: comfy-courier[postgres]) instead of SQLite",
    )
    args = parser.parse()
    comfy = comfy_dir_of(args)
    n, duration, rounds = args.requests, args.duration, args.rounds
    gap = 0.03 if comfy is None else 0.06
    facts = print_header(
        "intake: POST /execute-workflow vs ComfyUI's POST /prompt",
        "p50 latency <= 1.0x /prompt; req/s at 32 clients >= 0.8x /prompt",
        args,
    )
    wf = workflow("model-free.json")
    modes = ("busy", "live")
    phases: dict[str, dict[str, list[dict[str, Any]]]] = {
        m: {"prompt": [], "courier": []} for m in modes
    }
    with TempDir(args.keep, "bench-intake-") as tmp:
        peers = start_peers(tmp / "peers.log")
        db = None
        reader: JournalReader | PostgresReader
        if args.db:
            schema = f"bench_{int(time.time())}"
            db = {"COURIER_DB": args.db, "COURIER_DB_SCHEMA": schema}
        server = start_intake_server(tmp / "server", comfy, peers, db)
        if args.db:
            server.wait_up()
            reader = PostgresReader(args.db, schema)
        else:
            reader = JournalReader(server.db)
        try:
            server.wait_up()
            asyncio.run(latency_phase(server.url, wf, 10, gap, reader))  # warm-up
            server.drain()
            lat = asyncio.run(latency_phase(server.url, wf, n, gap, reader))
            server.drain()
            for mode in modes:
                order: list[str] = []
                for r in range(rounds):
                    order += ["prompt", "courier"] if r % 2 == 0 else ["courier", "prompt"]
                for kind in order:
                    if mode == "busy":  # a GPU-like job holds the worker: intake alone
                        server.block_worker(duration + 3)
                    result = asyncio.run(load_phase(server.url, kind, wf, args.clients, duration))
                    if mode == "busy":
                        server.clear_queue()
                    result["drain_s"] = server.drain()
                    phases[mode][kind].append(result)
                    print(
                        f"   phase {mode:4s} worker {kind:8s} {result['rps']:7.1f} req/s "
                        f"ok={result['ok']} other={result['other']} "
                        f"p50={result['p50'] * 1000:.1f} ms p99={result['p99'] * 1000:.1f} ms "
                        f"(drained in {result['drain_s']:.1f} s)"
                    )
        finally:
            reader.close()
            server.stop()
            peers.stop()
    lp, lc = lat["lat"]["prompt"], lat["lat"]["courier"]
    lat_ratio = p50(lc) / p50(lp)
    rps = {
        m: {k: p50([r["rps"] for r in phases[m][k]]) for k in ("prompt", "courier")} for m in modes
    }
    ratios = {m: rps[m]["courier"] / rps[m]["prompt"] for m in modes}
    print(
        table(
            [
                "endpoint",
                "p50",
                "p90",
                "p99",
                f"req/s @{args.clients} busy worker",
                "req/s live worker",
            ],
            [
                [
                    "POST /prompt",
                    f"{p50(lp) * 1000:.2f} ms",
                    f"{pct(lp, 90) * 1000:.2f} ms",
                    f"{pct(lp, 99) * 1000:.2f} ms",
                    f"{rps['busy']['prompt']:.1f}",
                    f"{rps['live']['prompt']:.1f}",
                ],
                [
                    "POST /execute-workflow",
                    f"{p50(lc) * 1000:.2f} ms",
                    f"{pct(lc, 90) * 1000:.2f} ms",
                    f"{pct(lc, 99) * 1000:.2f} ms",
                    f"{rps['busy']['courier']:.1f}",
                    f"{rps['live']['courier']:.1f}",
                ],
            ],
        )
    )
    print(
        "   busy worker: a sleeping job holds ComfyUI's worker during the phase (as a GPU job\n"
        "   would); live worker: the queued model-free jobs execute during the phase."
    )
    print(
        f"   journal rows committed before the 202: {lat['committed']}/{lat['checked']}"
        + (f"; unexpected answers: {lat['bad'][:3]}" if lat["bad"] else "")
    )
    ok_lat = lat_ratio <= 1.0 and lat["committed"] == lat["checked"]
    print(
        f"RESULT intake p50 ratio                  {lat_ratio:.2f}x (target <= 1.00x)  "
        f"{verdict(ok_lat)}"
    )
    for m in modes:
        print(
            f"RESULT intake req/s ratio, {m} worker     {ratios[m]:.2f}x (target >= 0.80x)  "
            f"{verdict(ratios[m] >= 0.8)}"
        )
    write_json(
        args,
        {
            "facts": facts,
            "n": n,
            "clients": args.clients,
            "duration": duration,
            "latency_p50_ms": {"prompt": p50(lp) * 1000, "courier": p50(lc) * 1000},
            "latency_p90_ms": {"prompt": pct(lp, 90) * 1000, "courier": pct(lc, 90) * 1000},
            "rps": rps,
            "phases": phases,
            "latency_ratio": lat_ratio,
            "rps_ratio": ratios,
            "committed": lat["committed"],
            "checked": lat["checked"],
            "bad": lat["bad"][:10],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
