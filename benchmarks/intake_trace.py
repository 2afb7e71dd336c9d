"""Where one request's time goes: time stamps along the path of /prompt and /execute-workflow.

A diagnostic beside bench_intake.py (no target of its own), for a real ComfyUI only. The
server runs with COURIER_BENCH_TRACE=1: bench_node.py then stamps, on ComfyUI's server
loop, the request's first bytes (`in`), the courier's parse, submit, validation, journal
call and answer, the 202's write (`respond`, `responded`) and the put on ComfyUI's queue,
and on ComfyUI's worker thread the prompt's execution (`exec`). perf_counter there and
time.monotonic here read one clock (CLOCK_MONOTONIC on Linux), so each request's stamps line
up with the client's send and read. For each request the client also reads, from
/proc/<pid>/task/<tid>/schedstat, how long it and the server loop thread were runnable but
waiting for a CPU.

Blocks of --requests requests of one endpoint, P C C P, in the mode of bench_intake.py's
latency mode of the same name (draining, idle or busy). Prints, per block, the median of
each segment between two stamps, and splits the requests by whether their job started
executing before the client had read the answer.

    python benchmarks/intake_trace.py --comfy-dir DIR [--mode draining] [--requests 150]
        [--json FILE]
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_intake import draining_bodies, start_intake_server, ui_prompt_body  # noqa: E402
from client import COURIER_HEADERS, RawClient, courier_body, http_json, unique_id  # noqa: E402
from options import BenchParser, TempDir, comfy_dir_of  # noqa: E402
from peers import start_peers  # noqa: E402
from report import print_header, write_json  # noqa: E402
from servers import Server  # noqa: E402
from workflows import workflow  # noqa: E402

GAPS = {"draining": 0.02, "idle": 0.06, "busy": 0.02}


def run_queue_wait(path: str) -> int:
    """Nanoseconds the thread has been runnable but not running (schedstat's 2nd field)."""
    with open(path) as f:
        return int(f.read().split()[1])


class StampingClient(RawClient):
    """RawClient that notes when the first bytes of each answer were there to read."""

    first_bytes = 0.0

    async def _connect(self) -> None:
        await super()._connect()
        assert self.reader is not None
        reader = self.reader
        readuntil = reader.readuntil

        async def stamped(separator: bytes = b"\n") -> bytes:
            if not reader._buffer:  # type: ignore[attr-defined]
                await reader._wait_for_data("readuntil")  # type: ignore[attr-defined]
            self.first_bytes = time.monotonic()
            return await readuntil(separator)

        reader.readuntil = stamped  # type: ignore[method-assign]


async def block(
    server: Server, wf: dict[str, Any], kind: str, mode: str, n: int
) -> list[dict[str, Any]]:
    client = StampingClient(server.url)
    loop_stat = f"/proc/{server.pid}/task/{server.pid}/schedstat"
    own_stat = "/proc/thread-self/schedstat"
    out = []
    for _ in range(n):
        if mode == "draining":
            body, path, headers, _want = draining_bodies(wf, kind)
        elif kind == "prompt":
            body, path, headers = ui_prompt_body(wf), "/prompt", {}
        else:
            body = courier_body(wf, unique_id("trace"))
            path, headers = "/execute-workflow", COURIER_HEADERS
        own0, loop0 = run_queue_wait(own_stat), run_queue_wait(loop_stat)
        sent = time.monotonic()
        status, raw = await client.request("POST", path, body, headers)
        read = time.monotonic()
        out.append(
            {
                "sent": sent,
                "read": read,
                "first_bytes": client.first_bytes,
                "status": status,
                "client_waited": (run_queue_wait(own_stat) - own0) / 1e9,
                "loop_waited": (run_queue_wait(loop_stat) - loop0) / 1e9,
            }
        )
        await asyncio.sleep(GAPS[mode])
    await client.close()
    return out


def segments(requests: list[dict[str, Any]], trace: list[list[Any]]) -> list[dict[str, float]]:
    """Per request: the time between consecutive stamps of its path, and around it."""
    rows = []
    for req in requests:
        sent, read = req["sent"], req["read"]
        path = sorted(
            (t, label) for t, label in trace if sent <= t <= read and not label.startswith("exec")
        )
        starts = [t for t, label in path if label == "in"]
        if not starts:
            continue
        path = [(t, label) for t, label in path if t >= starts[0]]
        row = {
            "total": read - sent,
            "client waited for a CPU": req["client_waited"],
            "server loop thread waited for a CPU": req["loop_waited"],
            "client -> in": starts[0] - sent,
        }
        seen = {"in"}
        last_t, last = path[0]
        for t, label in path[1:]:
            if label in seen:
                continue
            seen.add(label)
            row[f"{last} -> {label}"] = t - last_t
            last_t, last = t, label
        row[f"{last} -> first bytes at the client"] = req["first_bytes"] - last_t
        row["first bytes -> read"] = read - req["first_bytes"]
        execs = sorted(t for t, label in trace if label == "exec" and sent <= t <= read + 0.05)
        if execs:
            row["job's execution started, from the client's read"] = execs[0] - read
        rows.append(row)
    return rows


def report(kind: str, rows: list[dict[str, float]]) -> None:
    def median_us(subset: list[dict[str, float]], key: str) -> str:
        values = [r[key] for r in subset if key in r]
        return f"{statistics.median(values) * 1e6:7.0f}" if values else "      -"

    counts: collections.Counter[str] = collections.Counter()
    for r in rows:
        counts.update(r.keys())
    keys = [k for k, c in counts.items() if c >= len(rows) / 2]
    early = [r for r in rows if r.get("job's execution started, from the client's read", 1) < 0]
    late = [r for r in rows if r not in early]
    print(f"== {kind}: {len(rows)} requests; medians in µs")
    print(f"   {'segment':58s} {'all':>7s} {'early':>7s} {'other':>7s}")
    for key in keys:
        print(f"   {key:58s} {median_us(rows, key)} {median_us(early, key)} {median_us(late, key)}")
    print(
        f"   early: the job started executing before the client had read the answer "
        f"({len(early)}/{len(rows)})"
    )


def main() -> int:
    parser = BenchParser(__doc__)
    parser.add_argument("--mode", choices=sorted(GAPS), default="draining")
    parser.add_size("--requests", 40, 150, "requests per block (4 blocks: P C C P)")
    args = parser.parse()
    comfy = comfy_dir_of(args)
    if comfy is None:
        parser.error("a real ComfyUI is needed (--comfy-dir or COMFYUI_DIR)")
    facts = print_header(
        f"intake trace: where a request's time goes ({args.mode} mode)", "none (diagnostic)", args
    )
    wf = workflow("model-free.json")
    found: dict[str, list[dict[str, float]]] = {"prompt": [], "courier": []}
    with TempDir(args.keep, "intake-trace-") as tmp:
        peers = start_peers(tmp / "peers.log")
        server = start_intake_server(
            tmp / "server", comfy, peers, extra_env={"COURIER_BENCH_TRACE": "1"}
        )
        try:
            server.wait_up()
            for kind in ("prompt", "courier"):  # warm-up
                asyncio.run(block(server, wf, kind, "draining", 10))
            server.drain()
            for kind in ("prompt", "courier", "courier", "prompt"):
                if args.mode == "busy":
                    server.block_worker(args.requests * (GAPS["busy"] + 0.01) + 3)
                http_json(f"{server.url}/courier-bench/trace")  # clear
                requests = asyncio.run(block(server, wf, kind, args.mode, args.requests))
                trace = http_json(f"{server.url}/courier-bench/trace")[1]
                if args.mode == "busy":
                    server.clear_queue()
                server.drain()
                rows = segments(requests, trace)
                report(kind, rows)
                found[kind] += rows
        finally:
            server.stop()
            peers.stop()
    write_json(args, {"facts": facts, "mode": args.mode, "rows": found})
    return 0


if __name__ == "__main__":
    sys.exit(main())
