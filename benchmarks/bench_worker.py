"""Worker: slow storage must not slow ComfyUI's worker.

Target (issue 7): with storage answering 600 ms late, the busy span of 20 back-to-back small
jobs (first execution_start to last execution_success, from the timestamps in ComfyUI's
history, status.messages) stays within 1.05x of the span with instant storage.

Method: Supabase storage is the fake Storage server of tests/fakes/storage_server.py, in its
own process (peers.py); its `delay_uploads` is switched between 0 and 0.6 s. Each batch posts
20 jobs at once to /execute-workflow, waits for their 20 callbacks, then reads the 20 history
entries. Batches alternate instant/slow in ABBA order; the ratio is median(slow spans) /
median(instant spans). The callbacks' upload times are printed to show the delay was real.
For reference, each round also runs the same 20 jobs through plain ComfyUI (POST /prompt,
SaveImage instead of SaveAndCallback): the courier's own cost to the worker.

Jobs: real ComfyUI runs txt2img-sd15.json (tiny checkpoint, new seed per job) when the
checkpoint exists, else model-free.json at 512x512; the stand-in runs
EmptyImage 512x512 -> SlowNode 50 ms (GIL released, like GPU work) -> SaveAndCallback.

    python benchmarks/bench_worker.py [--quick] [--standin] [--delay 0.6] [--jobs 20]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client import RawClient, history_span, http_json, submit_job, submit_prompt, unique_id  # noqa: E402
from options import BenchParser, TempDir, comfy_dir_of  # noqa: E402
from peers import start_peers  # noqa: E402
from report import print_header, table, verdict, write_json  # noqa: E402
from servers import start_server  # noqa: E402
from stats import p50  # noqa: E402
from workflows import with_save_image, workflow  # noqa: E402


def job_maker(comfy: Path | None, name: str) -> tuple[str, Callable[[int], dict[str, Any]]]:
    if comfy is None:

        def standin(i: int) -> dict[str, Any]:
            return {
                "1": {
                    "class_type": "EmptyImage",
                    "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": i},
                },
                "2": {"class_type": "SlowNode", "inputs": {"images": ["1", 0], "seconds": 0.05}},
                "3": {
                    "class_type": "SaveAndCallback",
                    "inputs": {"images": ["2", 0], "filename_prefix": "worker"},
                },
            }

        return "EmptyImage 512x512 -> SlowNode 50 ms -> SaveAndCallback (stand-in)", standin
    checkpoint = comfy / "models" / "checkpoints" / "tiny_sd15_random.safetensors"
    if name == "txt2img" and checkpoint.exists():
        base = workflow("txt2img-sd15.json")

        def txt2img(i: int) -> dict[str, Any]:
            wf = json.loads(json.dumps(base))
            wf["3"]["inputs"]["seed"] = 1000 + i
            return wf

        return "txt2img-sd15.json (tiny checkpoint, 64x64, 2 steps; new seed per job)", txt2img
    base = workflow("model-free.json")

    def model_free(i: int) -> dict[str, Any]:
        wf = json.loads(json.dumps(base))
        wf["1"]["inputs"].update({"width": 512, "height": 512, "color": i})
        return wf

    return "model-free.json at 512x512 (new colour per job)", model_free


def gc_pauses(url: str, start_ms: float, end_ms: float) -> list[dict[str, Any]]:
    """Garbage collections over 5 ms inside [start_ms, end_ms] (bench_node.py records them in
    a real ComfyUI; the stand-in has none to report)."""
    status, found = http_json(f"{url}/courier-bench/gc")
    if status != 200 or not isinstance(found, list):
        return []
    return [g for g in found if start_ms <= g["start"] * 1000 <= end_ms]


def gc_text(result: dict[str, Any]) -> str:
    """`412 ms (worker 280, MainThread 132)`, or "-" without any."""
    if not result.get("gc_ms"):
        return "-"
    parts = ", ".join(f"{t} {ms:.0f}" for t, ms in result["gc_by_thread"].items())
    return f"{result['gc_ms']:.0f} ms ({parts})"


def key_value(batch: dict[str, Any], key: str) -> float:
    if key == "span_without_gc":
        return float(batch["span_ms"] - batch.get("gc_ms", 0.0))
    return float(batch[key])


def gc_summary(pauses: list[dict[str, Any]]) -> dict[str, Any]:
    by_thread: dict[str, float] = {}
    for g in pauses:
        name = "worker" if "prompt_worker" in g["thread"] else g["thread"]
        by_thread[name] = by_thread.get(name, 0.0) + g["ms"]
    return {"gc_ms": sum(g["ms"] for g in pauses), "gc_by_thread": by_thread}


async def run_batch(
    url: str,
    peers: Any,
    make: Callable[[int], dict[str, Any]],
    jobs: int,
    seq: int,
    timeout: float = 600.0,
) -> dict[str, Any]:
    async def post(i: int) -> tuple[str, str]:
        cid = unique_id("worker")
        client = RawClient(url)
        try:
            return cid, await submit_job(client, make(seq * 1000 + i), cid)
        finally:
            await client.close()

    posted = await asyncio.gather(*(post(i) for i in range(jobs)))
    wanted = {cid for cid, _ in posted}
    deadline = time.monotonic() + timeout
    got: dict[str, dict[str, Any]] = {}
    while len(got) < len(wanted):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(got)}/{jobs} callbacks after {timeout:.0f} s")
        for cb in peers.callbacks():
            if cb["cid"] in wanted:
                got[cb["cid"]] = cb
        await asyncio.sleep(0.1)
    starts, ends, execs = [], [], []
    for _, prompt_id in posted:
        entry = http_json(f"{url}/history/{prompt_id}")[1][prompt_id]
        start, end = history_span(entry)
        if start is None or end is None:
            raise RuntimeError(f"history of {prompt_id} lacks timestamps: {entry.get('status')}")
        starts.append(start)
        ends.append(end)
        execs.append(end - start)
    failed = [cb for cb in got.values() if cb["status"] != "success"]
    uploads = [cb["body"].get("timings", {}).get("upload_ms") for cb in got.values()]
    return {
        "span_ms": max(ends) - min(starts),
        "exec_sum_ms": sum(execs),
        "upload_ms_p50": p50([u for u in uploads if u is not None]),
        "failed": len(failed),
        **gc_summary(gc_pauses(url, min(starts), max(ends))),
    }


async def run_plain_batch(
    url: str, make: Callable[[int], dict[str, Any]], jobs: int, seq: int, timeout: float = 600.0
) -> dict[str, Any]:
    """The same jobs through POST /prompt with SaveImage: ComfyUI without the courier."""

    async def post(i: int) -> str:
        client = RawClient(url)
        try:
            return await submit_prompt(client, with_save_image(make(seq * 1000 + i), "plain"))
        finally:
            await client.close()

    ids = await asyncio.gather(*(post(i) for i in range(jobs)))
    deadline = time.monotonic() + timeout
    starts, ends = [], []
    for prompt_id in ids:
        while True:
            hist = http_json(f"{url}/history/{prompt_id}")[1]
            if prompt_id in hist:
                start, end = history_span(hist[prompt_id])
                if start is not None and end is not None:
                    starts.append(start)
                    ends.append(end)
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("plain batch did not finish")
            await asyncio.sleep(0.1)
    execs = [e - s for s, e in zip(starts, ends, strict=True)]
    return {
        "span_ms": max(ends) - min(starts),
        "exec_sum_ms": sum(execs),
        **gc_summary(gc_pauses(url, min(starts), max(ends))),
    }


def main() -> int:
    parser = BenchParser(__doc__)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.6, help="storage answer delay (s)")
    parser.add_size("--rounds", 1, 3, "ABBA rounds (2 batches of each per round)")
    parser.add_argument(
        "--workflow", choices=["txt2img", "model-free"], default="txt2img", help="real ComfyUI only"
    )
    args = parser.parse()
    comfy = comfy_dir_of(args)
    rounds = args.rounds
    facts = print_header(
        "worker: busy span of back-to-back jobs, slow vs instant storage",
        f"span with storage {args.delay * 1000:.0f} ms late <= 1.05x span with instant storage",
        args,
    )
    description, make = job_maker(comfy, args.workflow)
    print(f"   jobs   : {args.jobs} per batch; {description}")
    spans: dict[float, list[float]] = {0.0: [], args.delay: []}
    batches: dict[str, list[dict[str, Any]]] = {"plain": [], "instant": [], "slow": []}
    plain: list[float] = []
    rows = []
    with TempDir(args.keep, "bench-worker-") as tmp:
        peers = start_peers(tmp / "peers.log")
        server = start_server(tmp / "server", comfy, peers.supabase_env())
        try:
            server.wait_up()
            peers.set_delay(0.0)
            asyncio.run(run_batch(server.url, peers, make, 3, 999))  # warm-up (model load)
            asyncio.run(run_plain_batch(server.url, make, 2, 998))
            order: list[float | None] = []  # None: plain ComfyUI (POST /prompt, SaveImage)
            for _ in range(rounds):
                order += [None, 0.0, args.delay, args.delay, 0.0, None]
            for seq, delay in enumerate(order):
                if delay is None:
                    cpu0 = server.loop_cpu()
                    result = asyncio.run(run_plain_batch(server.url, make, args.jobs, seq))
                    result["loop_cpu_ms"] = (server.loop_cpu() - cpu0) * 1000
                    plain.append(result["span_ms"])
                    batches["plain"].append(result)
                    rows.append(
                        [
                            "plain /prompt + SaveImage",
                            f"{result['span_ms']:.0f} ms",
                            f"{result['exec_sum_ms']:.0f} ms",
                            gc_text(result),
                            "-",
                            "-",
                        ]
                    )
                    server.drain()
                    continue
                peers.set_delay(delay)
                cpu0 = server.loop_cpu()
                result = asyncio.run(run_batch(server.url, peers, make, args.jobs, seq))
                result["loop_cpu_ms"] = (server.loop_cpu() - cpu0) * 1000
                spans[delay].append(result["span_ms"])
                batches["instant" if delay == 0.0 else "slow"].append(result)
                rows.append(
                    [
                        f"courier, storage +{delay * 1000:.0f} ms",
                        f"{result['span_ms']:.0f} ms",
                        f"{result['exec_sum_ms']:.0f} ms",
                        gc_text(result),
                        f"{result['upload_ms_p50']:.0f} ms",
                        result["failed"],
                    ]
                )
                server.drain()
        finally:
            server.stop()
            peers.stop()
    print(
        table(
            [
                "batch",
                "busy span",
                "sum of job executions",
                "GC pauses in the span",
                "callback upload_ms p50",
                "failed",
            ],
            rows,
        )
    )
    fast, slow = p50(spans[0.0]), p50(spans[args.delay])
    ratio = slow / fast

    def median_of(kind: str, key: str) -> float:
        return p50([key_value(b, key) for b in batches[kind]])

    print(
        f"   median span: instant {fast:.0f} ms, {args.delay * 1000:.0f} ms late {slow:.0f} ms, "
        f"plain ComfyUI {p50(plain):.0f} ms (courier/plain {fast / p50(plain):.3f}x)"
    )
    no_gc = median_of("slow", "span_without_gc") / median_of("instant", "span_without_gc")
    execs = median_of("slow", "exec_sum_ms") / median_of("instant", "exec_sum_ms")
    print(
        "   late/instant without the GC pauses inside the spans: "
        f"{no_gc:.3f}x; of the sums of job executions: {execs:.3f}x"
    )
    print(
        "   server loop thread CPU per batch (median): "
        + ", ".join(f"{k} {median_of(k, 'loop_cpu_ms'):.0f} ms" for k in batches if batches[k])
    )
    print(f"RESULT worker span ratio     {ratio:.3f}x (target <= 1.05x)  {verdict(ratio <= 1.05)}")
    write_json(
        args,
        {
            "facts": facts,
            "jobs": args.jobs,
            "workflow": description,
            "spans_ms": {"instant": spans[0.0], "slow": spans[args.delay], "plain": plain},
            "ratio": ratio,
            "ratio_without_gc": no_gc,
            "ratio_exec_sum": execs,
            "batches": batches,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
