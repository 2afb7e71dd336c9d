"""Several hosts on one PostgreSQL (issue 16): throughput with 1, 2 and 3 hosts, claim
latency, a busy host's GPU gap, intake against /prompt, and what a remote database adds.

Targets, each measured side by side in one run:
- throughput of N stand-in hosts running fixed-duration jobs >= 0.95 x N x one host's;
- claim latency (a job committed on a busy host -> on an idle host's ComfyUI queue) p50
  <= 5 ms on a loopback Postgres;
- a busy host's GPU gap between consecutive jobs when the next must be claimed, p50 <= 5 ms;
- intake p50 on Postgres <= 1.0 x ComfyUI's own POST /prompt on a loopback Postgres.

Hosts are processes of the ComfyUI stand-in (standin_server.py --probe, which reports the
wall-clock times of each prompt's commit, queue put, start and end). The database is a
throwaway PostgreSQL started from the server binaries (tests/pgcluster.py) with its
default durability (fsync on). A remote database is modelled by a proxy that delays every
packet by half the round trip each way.

    python benchmarks/bench_fleet.py [--quick] [--rtt-ms 10] [--json FILE] [--keep]
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import API_KEY, use_repo_package  # noqa: E402

use_repo_package()

from aiohttp import web  # noqa: E402

from fleet_hosts import Fleet  # noqa: E402
from options import BenchParser, TempDir  # noqa: E402
from pgcluster import Cluster, find_bindir  # noqa: E402
from report import print_header, table, verdict, write_json  # noqa: E402
from stats import p50, pct  # noqa: E402

JOB_SECONDS = 0.25  # the fixed duration of a throughput job (BlockingNode: a GPU busy)


def model_free(prefix: str = "bench") -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 16753920}},
        "2": {"class_type": "SaveAndCallback",
              "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }  # fmt: skip


def fixed(seconds: float) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}},
        "5": {"class_type": "BlockingNode", "inputs": {"images": ["1", 0], "seconds": seconds}},
        "2": {"class_type": "SaveAndCallback", "inputs": {"images": ["5", 0]}},
    }


class Callbacks:
    """A loopback callback receiver: arrival time (time.time()) per content_request_id."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            body = await request.json()
            self.arrived.setdefault(body["content_request_id"], time.time())
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/callback", handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/callback"

    async def wait(self, ids: list[str], timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while any(cid not in self.arrived for cid in ids):
            if time.monotonic() > deadline:
                missing = [cid for cid in ids if cid not in self.arrived]
                raise RuntimeError(f"{len(missing)} callbacks missing, e.g. {missing[:3]}")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class DelayProxy:
    """TCP proxy that delivers every chunk `one_way` seconds after it arrived, in order,
    in both directions: a database `2 * one_way` of round trip away."""

    def __init__(self, target_port: int, one_way: float) -> None:
        self.target_port = target_port
        self.one_way = one_way
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer),
                             return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                at, data = await queue.get()
                if not data:
                    writer.close()
                    return
                await asyncio.sleep(max(0.0, at + self.one_way - time.monotonic()))
                writer.write(data)

        sender = asyncio.ensure_future(send())
        try:
            while True:
                data = await reader.read(65536)
                await queue.put((time.monotonic(), data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


async def start_fleet(folder: Path, n: int, db: str, callbacks: Callbacks,
                      **env: str) -> Fleet:
    environ = {"COURIER_API_KEY": API_KEY, "COURIER_CALLBACK_URL": callbacks.url,
               "COURIER_PUBLIC_BASE_URL": "http://courier.test:8188", "COURIER_DB": db,
               "COURIER_DB_SCHEMA": f"b_{uuid.uuid4().hex[:10]}", "COURIER_MAX_QUEUE": "100000",
               **env}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(folder, environ, API_KEY, extra=("--probe",))
    fleet.start(n)
    await fleet.ready()
    return fleet


async def probe(fleet: Fleet, index: int) -> dict[str, dict[str, float]]:
    return dict((await fleet.client(index).get("/bench/probe")).json())


# -- throughput ---------------------------------------------------------------------------


async def throughput(folder: Path, url: str, callbacks: Callbacks, hosts: int,
                     per_host: int) -> float:
    """Jobs a second, first POST to last callback, of per_host x hosts fixed jobs posted
    round-robin (as a load balancer would) at once."""
    fleet = await start_fleet(folder, hosts, url, callbacks)
    try:
        ids = [f"t{hosts}-{uuid.uuid4().hex[:8]}-{i}" for i in range(per_host * hosts)]
        started = time.time()
        await asyncio.gather(*(fleet.post(1 + i % hosts, fixed(JOB_SECONDS), cid)
                               for i, cid in enumerate(ids)))
        await callbacks.wait(ids)
        return len(ids) / (max(callbacks.arrived[cid] for cid in ids) - started)
    finally:
        await fleet.aclose()


# -- claim latency and GPU gap ------------------------------------------------------------


async def claim_latency(folder: Path, url: str, callbacks: Callbacks, jobs: int) -> list[float]:
    """ms from a job's commit on a busy host to its put on an idle host's queue."""
    fleet = await start_fleet(folder, 2, url, callbacks)
    try:
        await fleet.post(1, fixed(3600), "hog")  # host 1 stays busy
        await fleet.wait_state(1, "hog", "running")
        await probe(fleet, 1)
        await probe(fleet, 2)
        prompts = []
        for i in range(jobs):
            cid = f"c-{uuid.uuid4().hex[:8]}-{i}"
            body = (await fleet.post(1, model_free(), cid)).json()
            prompts.append(body["prompt_id"])
            await callbacks.wait([cid])
        committed, put = (await probe(fleet, 1))["committed"], (await probe(fleet, 2))["put"]
        return [(put[p] - committed[p]) * 1000 for p in prompts if p in put and p in committed]
    finally:
        await fleet.aclose()


async def gpu_gap(folder: Path, db: str, callbacks: Callbacks, jobs: int) -> list[float]:
    """ms between one job's end and the next one's start on one host, `jobs` posted at once."""
    fleet = await start_fleet(folder, 1, db, callbacks)
    try:
        ids = [f"g-{uuid.uuid4().hex[:8]}-{i}" for i in range(jobs)]
        for cid in ids:  # in order: the queue's order is the posting order
            await fleet.post(1, fixed(0.05), cid)
        await callbacks.wait(ids)
        times = await probe(fleet, 1)
        runs = sorted((times["start"][p], times["end"][p]) for p in times["start"]
                      if p in times["end"])
        return [(start - end) * 1000 for (_, end), (start, _) in zip(runs, runs[1:], strict=False)]
    finally:
        await fleet.aclose()


# -- intake -------------------------------------------------------------------------------


async def intake(folder: Path, db: str, callbacks: Callbacks, requests: int) -> dict[str, float]:
    """p50 ms of POST /prompt and POST /execute-workflow, alternating, one at a time, the
    worker busy (as bench_intake.py measures)."""
    fleet = await start_fleet(folder, 1, db, callbacks)
    try:
        await fleet.post(1, fixed(3600), "hog")
        await fleet.wait_state(1, "hog", "running")
        client = fleet.client(1)
        prompt_ms: list[float] = []
        courier_ms: list[float] = []
        for i in range(requests + 20):
            t0 = time.perf_counter()
            r = await client.post("/prompt", json={"prompt": model_free(), "client_id": "b"})
            t1 = time.perf_counter()
            c = await fleet.post(1, model_free(), f"i-{uuid.uuid4().hex[:8]}-{i}")
            t2 = time.perf_counter()
            assert r.status_code == 200 and c.status_code == 202, (r.text, c.text)
            if i >= 20:  # warm-up: connections, prepared statements
                prompt_ms.append((t1 - t0) * 1000)
                courier_ms.append((t2 - t1) * 1000)
        return {"prompt_p50": p50(prompt_ms), "courier_p50": p50(courier_ms),
                "prompt_p90": pct(prompt_ms, 90), "courier_p90": pct(courier_ms, 90)}
    finally:
        await fleet.aclose()


async def end_to_end(folder: Path, db: str, callbacks: Callbacks, jobs: int) -> dict[str, float]:
    """p50 ms of request -> callback for a model-free job on an idle host, of the 202, and
    of the end of the prompt in ComfyUI -> callback for a job that runs (0.1 s)."""
    fleet = await start_fleet(folder, 1, db, callbacks)
    try:
        e2e, accept = [], []
        for i in range(jobs + 5):
            cid = f"e-{uuid.uuid4().hex[:8]}-{i}"
            t0 = time.time()
            await fleet.post(1, model_free(), cid)
            t1 = time.time()
            await callbacks.wait([cid])
            if i >= 5:
                e2e.append((callbacks.arrived[cid] - t0) * 1000)
                accept.append((t1 - t0) * 1000)
        await probe(fleet, 1)
        ran: dict[str, str] = {}
        for i in range(jobs // 2 + 3):
            cid = f"r-{uuid.uuid4().hex[:8]}-{i}"
            ran[(await fleet.post(1, fixed(0.1), cid)).json()["prompt_id"]] = cid
            await callbacks.wait([cid])
        ends = (await probe(fleet, 1))["end"]
        tail = [(callbacks.arrived[cid] - ends[p]) * 1000 for p, cid in list(ran.items())[3:]
                if p in ends]
        return {"e2e_p50": p50(e2e), "accept_p50": p50(accept), "tail_p50": p50(tail)}
    finally:
        await fleet.aclose()


async def main() -> None:
    parser = BenchParser(__doc__ or "")
    parser.add_size("--per-host", 8, 40, "throughput jobs per host")
    parser.add_size("--claims", 30, 200, "claim latency samples")
    parser.add_size("--gaps", 20, 80, "GPU gap samples")
    parser.add_size("--requests", 100, 400, "intake requests per route")
    parser.add_size("--e2e", 20, 60, "end-to-end samples per database")
    parser.add_argument("--rtt-ms", type=float, default=10.0, help="the remote database's RTT")
    parser.add_argument("--only", default="throughput,claims,gap,intake,remote",
                        help="comma-separated sections to run (default: all)")
    args = parser.parse()
    only = set(args.only.split(","))
    facts = print_header("bench_fleet: several hosts on one PostgreSQL", "issue 16", args)
    bindir = find_bindir()
    if bindir is None:
        print("   no PostgreSQL binaries (initdb, pg_ctl): nothing to measure")
        return
    results: dict[str, Any] = {"machine": facts}
    callbacks = Callbacks()
    await callbacks.start()
    with TempDir(args.keep, "bench-fleet-") as tmp:
        cluster = await asyncio.to_thread(Cluster(bindir, fsync=True).start)
        proxy = DelayProxy(cluster.port, args.rtt_ms / 2000)
        await proxy.start()
        remote = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres?sslmode=disable"
        try:
            if "throughput" in only:
                await section_throughput(args, tmp, cluster, callbacks, results)
            if "claims" in only:
                await section_claims(args, tmp, cluster, callbacks, results)
            if "gap" in only:
                await section_gap(args, tmp, cluster, callbacks, results)
            if "intake" in only:
                await section_intake(args, tmp, cluster, remote, callbacks, results)
            if "remote" in only:
                await section_remote(args, tmp, cluster, remote, callbacks, results)
        finally:
            await proxy.stop()
            await asyncio.to_thread(cluster.remove)
            await callbacks.stop()
    write_json(args, results)


async def section_throughput(args: Any, tmp: Path, cluster: Cluster, callbacks: Callbacks,
                     results: dict[str, Any]) -> None:
    # throughput: 1, 2, 3, then 1 again (the VM drifts: one host is the mean of both)
    rates = {}
    for n, label in ((1, "1a"), (2, "2"), (3, "3"), (1, "1b")):
        rates[label] = await throughput(tmp / f"tp{label}", cluster.url, callbacks, n,
                                        args.per_host)
    one = (rates["1a"] + rates["1b"]) / 2
    rows, ok = [], True
    for n in (1, 2, 3):
        rate = one if n == 1 else rates[str(n)]
        ratio = rate / (n * one)
        ok = ok and (n == 1 or ratio >= 0.95)
        rows.append([n, f"{rate:.2f}", f"{n / JOB_SECONDS:.2f}", f"{ratio:.3f}"])
    print(f"\n-- throughput, {JOB_SECONDS:g} s jobs, {args.per_host} per host")
    print(table(["hosts", "jobs/s", "ideal jobs/s", "x N x one host"], rows))
    print(f"   (one host: {rates['1a']:.2f} and {rates['1b']:.2f} jobs/s)")
    print(f"RESULT throughput >= 0.95 x N x one host: {verdict(ok)}")
    results["throughput"] = {"rates": rates, "one_host": one, "meets": ok}


async def section_claims(args: Any, tmp: Path, cluster: Cluster, callbacks: Callbacks,
                 results: dict[str, Any]) -> None:
    claims = await claim_latency(tmp / "claims", cluster.url, callbacks, args.claims)
    print(f"\n-- claim latency, commit on a busy host -> put on an idle one ({len(claims)})")
    print(f"   p50 {p50(claims):.2f} ms, p90 {pct(claims, 90):.2f} ms")
    print(f"RESULT claim latency p50 <= 5 ms: {verdict(p50(claims) <= 5)}")
    results["claim_ms"] = {"p50": p50(claims), "p90": pct(claims, 90)}


async def section_gap(args: Any, tmp: Path, cluster: Cluster, callbacks: Callbacks,
              results: dict[str, Any]) -> None:
    gaps_pg = await gpu_gap(tmp / "gap-pg", cluster.url, callbacks, args.gaps)
    gaps_sq = await gpu_gap(tmp / "gap-sq", str(tmp / "gap.sqlite3"), callbacks,
                            args.gaps)
    print(f"\n-- GPU gap, one host, {args.gaps} jobs posted at once")
    print(table(["store", "p50 ms", "p90 ms"], [
        ["postgres (next job claimed)", f"{p50(gaps_pg):.2f}", f"{pct(gaps_pg, 90):.2f}"],
        ["sqlite (next job queued)", f"{p50(gaps_sq):.2f}", f"{pct(gaps_sq, 90):.2f}"],
    ]))
    print(f"RESULT GPU gap p50 <= 5 ms: {verdict(p50(gaps_pg) <= 5)}")
    results["gap_ms"] = {"postgres_p50": p50(gaps_pg), "sqlite_p50": p50(gaps_sq)}


async def section_intake(args: Any, tmp: Path, cluster: Cluster, remote: str,
                 callbacks: Callbacks, results: dict[str, Any]) -> None:
    rows = []
    for label, db in (("postgres, loopback", cluster.url),
                      ("sqlite", str(tmp / "intake.sqlite3")),
                      (f"postgres, {args.rtt_ms:g} ms away", remote)):
        figures = await intake(tmp / f"in-{len(rows)}", db, callbacks, args.requests)
        ratio = figures["courier_p50"] / figures["prompt_p50"]
        figures["ratio"] = ratio
        results[f"intake {label}"] = figures
        rows.append([label, f"{figures['prompt_p50']:.2f}", f"{figures['courier_p50']:.2f}",
                     f"{ratio:.2f}"])
    print(f"\n-- intake, one request at a time, worker busy ({args.requests} each)")
    print(table(["store", "/prompt p50 ms", "/execute-workflow p50 ms", "ratio"], rows))
    loop_ratio = results["intake postgres, loopback"]["ratio"]
    print(f"RESULT intake p50 on loopback Postgres <= 1.0 x /prompt: "
          f"{verdict(loop_ratio <= 1.0)}")


async def section_remote(args: Any, tmp: Path, cluster: Cluster, remote: str,
                 callbacks: Callbacks, results: dict[str, Any]) -> None:
    near = await end_to_end(tmp / "e2e-near", cluster.url, callbacks, args.e2e)
    far = await end_to_end(tmp / "e2e-far", remote, callbacks, args.e2e)
    print(f"\n-- what a database {args.rtt_ms:g} ms away adds (model-free job, idle host)")
    print(table(["database", "202 p50 ms", "request -> callback p50 ms",
                 "prompt's end -> callback p50 ms"], [
        ["loopback", f"{near['accept_p50']:.2f}", f"{near['e2e_p50']:.2f}",
         f"{near['tail_p50']:.2f}"],
        [f"{args.rtt_ms:g} ms RTT", f"{far['accept_p50']:.2f}", f"{far['e2e_p50']:.2f}",
         f"{far['tail_p50']:.2f}"],
    ]))
    added = (far["e2e_p50"] - near["e2e_p50"]) / args.rtt_ms
    print(f"   = {added:.1f} round trips per job end to end, "
          f"{(far['accept_p50'] - near['accept_p50']) / args.rtt_ms:.1f} before the 202, "
          f"{(far['tail_p50'] - near['tail_p50']) / args.rtt_ms:.1f} after a prompt's end")
    results["remote"] = {"rtt_ms": args.rtt_ms, "near": near, "far": far,
                         "round_trips_e2e": added}


if __name__ == "__main__":
    asyncio.run(main())
