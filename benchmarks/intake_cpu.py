"""Where intake's time goes: server CPU per request, thread by thread, under load.

A diagnostic beside bench_intake.py (no target of its own). Phases alternate /prompt and
/execute-workflow (P C C P ...), 32 keep-alive clients, ComfyUI's worker held by a sleeping
job, as bench_intake's busy-worker mode. For each phase it reads every server thread's CPU
time and context switches from /proc (Linux) before and after, and prints them per
request, and the CPU of the server's child processes (the journal process). Req/s swing
by 10-20 % from phase to phase on a small VM; CPU per request of the
loop thread moves far less, so it shows what a change to intake saved. The loop thread's
CPU per request against the phase's wall time per request also shows how long the loop
waited (for the GIL, or for a core) instead of working.

    python benchmarks/intake_cpu.py [--quick] [--standin] [--rounds R] [--duration S]
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_intake import load_phase, start_intake_server  # noqa: E402
from options import BenchParser, TempDir, comfy_dir_of  # noqa: E402
from peers import start_peers  # noqa: E402
from report import print_header, table, write_json  # noqa: E402
from servers import child_pids  # noqa: E402
from workflows import workflow  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def thread_stats(pid: int) -> dict[str, tuple[float, int]]:
    """CPU seconds and context switches of each thread of `pid`, by thread id."""
    out: dict[str, tuple[float, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        switches = sum(
            int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line
        )
        out[tid] = ((int(fields[11]) + int(fields[12])) / TICKS, switches)
    return out


def children_cpu(pid: int) -> float:
    """CPU seconds of the processes whose parent is `pid` (the journal process)."""
    total = 0.0
    for child in child_pids(pid):
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = BenchParser(__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_size("--duration", 2.0, 4.0, "seconds per phase")
    parser.add_size("--rounds", 1, 3, "P C C P rounds")
    args = parser.parse()
    comfy = comfy_dir_of(args)
    duration, rounds = args.duration, args.rounds
    facts = print_header(
        "intake CPU: server CPU per request, by thread (diagnostic)",
        "none; shows where bench_intake's req/s ratio comes from",
        args,
    )
    wf = workflow("model-free.json")
    order: list[str] = []
    for _ in range(rounds):
        order += ["prompt", "courier", "courier", "prompt"]
    rows: dict[str, list[dict[str, float]]] = {"prompt": [], "courier": []}
    with TempDir(args.keep, "intake-cpu-") as tmp:
        peers = start_peers(tmp / "peers.log")
        server = start_intake_server(tmp / "server", comfy, peers, "local")
        try:
            server.wait_up()
            for kind in ("courier", "prompt"):  # warm-up
                asyncio.run(load_phase(server.url, kind, wf, args.clients, 1.0))
                server.clear_queue()
                server.drain()
            loop_tid = str(server.pid)
            for kind in order:
                server.block_worker(duration + 3)
                before, c0 = thread_stats(server.pid), client_cpu()
                k0 = children_cpu(server.pid)
                result = asyncio.run(load_phase(server.url, kind, wf, args.clients, duration))
                after, c1 = thread_stats(server.pid), client_cpu()
                k1 = children_cpu(server.pid)
                server.clear_queue()
                server.drain()
                n = max(result["ok"], 1)
                used = {
                    tid: (cpu - before.get(tid, (0.0, 0))[0], cs - before.get(tid, (0.0, 0))[1])
                    for tid, (cpu, cs) in after.items()
                }
                loop_cpu, loop_cs = used.pop(loop_tid, (0.0, 0))
                busiest = max(used.items(), key=lambda item: item[1][0], default=None)
                other_cpu = sum(cpu for cpu, _ in used.values())
                row = {
                    "rps": result["rps"],
                    "wall_us": 1e6 / result["rps"] if result["rps"] else 0.0,
                    "loop_us": loop_cpu * 1e6 / n,
                    "loop_switches": loop_cs / n,
                    "other_threads_us": other_cpu * 1e6 / n,
                    "busiest_other_switches": busiest[1][1] / n if busiest else 0.0,
                    "children_us": (k1 - k0) * 1e6 / n,
                    "client_us": (c1 - c0) * 1e6 / n,
                }
                rows[kind].append(row)
                print(
                    f"   {kind:8s} {row['rps']:7.0f} req/s  loop {row['loop_us']:6.1f} µs/req "
                    f"({row['loop_switches']:.2f} switches)  other threads "
                    f"{row['other_threads_us']:5.1f} µs/req  journal process "
                    f"{row['children_us']:5.1f} µs/req  client {row['client_us']:5.1f} µs/req",
                    flush=True,
                )
        finally:
            server.stop()
            peers.stop()
    med = {
        kind: {key: statistics.median(r[key] for r in rows[kind]) for key in rows[kind][0]}
        for kind in rows
    }
    print(
        table(
            ["median per request", "POST /prompt", "POST /execute-workflow", "ratio"],
            [
                [
                    label,
                    f"{med['prompt'][key]:.1f}",
                    f"{med['courier'][key]:.1f}",
                    f"{med['courier'][key] / med['prompt'][key]:.2f}x"
                    if med["prompt"][key]
                    else "-",
                ]
                for key, label in (
                    ("rps", "req/s"),
                    ("wall_us", "wall time per request (µs)"),
                    ("loop_us", "server loop thread CPU (µs)"),
                    ("loop_switches", "loop thread context switches"),
                    ("other_threads_us", "other server threads CPU (µs)"),
                    ("children_us", "journal process CPU (µs)"),
                    ("client_us", "load generator CPU (µs)"),
                )
            ],
        )
    )
    busy = {k: med[k]["loop_us"] / med[k]["wall_us"] for k in med if med[k]["wall_us"]}
    print(
        "   loop thread busy: "
        + ", ".join(f"{k} {v * 100:.0f} % of the wall time" for k, v in busy.items())
    )
    write_json(args, {"facts": facts, "phases": rows, "median": med})
    return 0


if __name__ == "__main__":
    sys.exit(main())
