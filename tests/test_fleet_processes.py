"""Three courier hosts as separate processes (the ComfyUI stand-in) on one PostgreSQL:
placement, a host killed or stalled mid-job, DELETE and status through any host, hosts
starting together on an empty database, the database restarting mid-run, and 1,000 jobs
with a flaky receiver. Every test: each accepted attempt gets exactly one final event."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import defaultdict

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from conftest import API_KEY, CALLBACK_KEY, SERVICE_KEY, Received, Receiver, model_free
from fleet_hosts import Fleet
from pgcluster import Cluster, find_bindir
from test_fault_injection import assert_one_event_each
from test_job_outcomes import slow_workflow

TAKEOVER = "2"  # s of silence before a host's jobs are taken over


@pytest.fixture
async def fleet(tmp_path, postgres_url, pg_schema, receiver):
    """fleet(n=3, url=..., **env): n hosts started together on an empty schema, ready."""
    made: list[Fleet] = []

    async def make(n: int = 3, url: str = postgres_url, schedule: str = "0,0.2,0.5",
                   **env: str) -> Fleet:
        environ = {"COURIER_API_KEY": API_KEY, "COURIER_DB": url, "COURIER_DB_SCHEMA": pg_schema,
                   "COURIER_CALLBACK_URL": receiver.url, "COURIER_CALLBACK_API_KEY": CALLBACK_KEY,
                   "COURIER_TAKEOVER_AFTER": TAKEOVER, "COURIER_PUBLIC_BASE_URL":
                   "http://courier.test:8188", **env}
        hosts = Fleet(tmp_path, environ, API_KEY, schedule)
        made.append(hosts)
        hosts.start(n)
        await hosts.ready()
        return hosts

    yield make
    for hosts in made:
        await hosts.aclose()


async def settled(receiver: Receiver, count: int, timeout: float = 30.0) -> None:
    await receiver.wait_for(count, timeout=timeout)
    await asyncio.sleep(0.3)  # a duplicate would arrive about now: it must not


async def test_jobs_posted_to_a_busy_host_run_on_the_idle_ones(fleet, receiver):
    hosts = await fleet(3)
    long = (await hosts.post(1, slow_workflow(4.0), "long")).json()
    await hosts.wait_state(1, "long", "running")
    shorts = [(await hosts.post(1, slow_workflow(0.2), f"short{i}")).json() for i in range(8)]
    assert all(body["state"] == "queued" for body in shorts)
    for i in range(8):
        assert (await hosts.wait_final(1, f"short{i}"))["state"] == "success"
    assert (await hosts.status(1, "long"))["state"] == "running"  # all 8 ended first
    places = [await hosts.ran_on((await hosts.status(1, f"short{i}"))["prompt_id"])
              for i in range(8)]
    assert all(place in ([2], [3]) for place in places), places
    assert {2, 3} == {p for place in places for p in place}
    assert (await hosts.wait_final(1, "long"))["state"] == "success"
    assert await hosts.ran_on(long["prompt_id"]) == [1]
    await settled(receiver, 9)
    assert_one_event_each(receiver, [("long", 1)] + [(f"short{i}", 1) for i in range(8)])


async def test_a_host_killed_mid_job_its_job_runs_again_elsewhere(fleet, receiver):
    hosts = await fleet(3)
    await hosts.post(1, slow_workflow(3.0, blocking=True), "victim")
    await hosts.wait_state(1, "victim", "running")
    others = [(await hosts.post(2, model_free(), f"other{i}")).status_code for i in range(4)]
    assert others == [202] * 4
    hosts.host(1).signal(signal.SIGKILL)
    final = await hosts.wait_final(2, "victim", timeout=30)
    assert final["state"] == "success" and final["attempt"] == 1
    assert await hosts.ran_on(final["prompt_id"]) in ([2], [3])
    for i in range(4):
        assert (await hosts.wait_final(3, f"other{i}"))["state"] == "success"
    await settled(receiver, 5)
    assert_one_event_each(receiver, [("victim", 1)] + [(f"other{i}", 1) for i in range(4)])


async def test_a_stalled_host_is_taken_over_and_fenced_when_it_continues(
        fleet, receiver, storage_server):
    hosts = await fleet(3, SUPABASE_URL=storage_server.url,
                        SUPABASE_SERVICE_ROLE_KEY=SERVICE_KEY)
    await hosts.post(1, slow_workflow(2.0, blocking=True), "stall")  # ignores interrupts
    await hosts.wait_state(1, "stall", "running")
    hosts.host(1).signal(signal.SIGSTOP)
    [body] = [r.json for r in await receiver.wait_for(1, timeout=30)]
    assert body["status"] == "success"
    assert body["image_url"].endswith("/stall/1_3-1.jpg")  # released (2), claimed (3)
    delivered = dict(storage_server.state.objects)
    hosts.host(1).signal(signal.SIGCONT)
    deadline = asyncio.get_running_loop().time() + 20
    while "fenced id=stall" not in hosts.host(1).log_text():
        assert asyncio.get_running_loop().time() < deadline, hosts.host(1).log_text()
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.5)  # the stalled run's node returns and its end is refused
    assert_one_event_each(receiver, [("stall", 1)])
    assert len(receiver.requests) == 1
    for key, stored in delivered.items():
        assert storage_server.state.objects[key] == stored  # nothing overwritten
    assert [u.path for u in storage_server.state.uploads].count("stall/1_3-1.jpg") == 1
    status = await hosts.status(1, "stall")
    assert status["state"] == "success" and status["image_url"] == body["image_url"]


async def test_delete_and_status_through_any_host(fleet, receiver):
    hosts = await fleet(3)
    accepted = (await hosts.post(1, slow_workflow(30), "cancel-me")).json()
    running = await hosts.wait_state(3, "cancel-me", "running")
    assert running["prompt_id"] == accepted["prompt_id"]
    assert [(await hosts.status(i, "cancel-me"))["state"] for i in (1, 2, 3)] == ["running"] * 3
    response = await hosts.client(3).delete("/execute-workflow/cancel-me")
    assert response.status_code == 202
    final = await hosts.wait_final(2, "cancel-me", timeout=5)
    assert final["error_type"] == "cancelled"
    await settled(receiver, 1)
    assert_one_event_each(receiver, [("cancel-me", 1)])
    assert (await hosts.client(2).get("/execute-workflow/nope")).status_code == 404


async def test_three_hosts_starting_together_migrate_once(fleet, receiver):
    hosts = await fleet(3)
    logs = [host.log_text() for host in hosts.hosts]
    assert sum("migrated from version 0" in log for log in logs) == 1
    health = [(await hosts.client(i).get("/courier/health")).json() for i in (1, 2, 3)]
    assert all(h["ready"] and h["fleet"]["hosts_live"] == 3 for h in health)
    for i in (1, 2, 3):
        assert (await hosts.post(i, model_free(), f"hello{i}")).status_code == 202
    await settled(receiver, 3)
    assert_one_event_each(receiver, [(f"hello{i}", 1) for i in (1, 2, 3)])


async def test_a_database_restart_mid_run_loses_nothing(tmp_path, fleet, receiver):
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("needs the PostgreSQL binaries to restart a server of its own")
    cluster = await asyncio.to_thread(Cluster(bindir, fsync=True).start)
    try:
        hosts = await fleet(3, url=cluster.url)
        ids = [f"r{i}" for i in range(9)]
        for i, cid in enumerate(ids):
            assert (await hosts.post(1 + i % 3, slow_workflow(0.5), cid)).status_code == 202
        await hosts.wait_state(1, "r0", "running")
        await asyncio.to_thread(cluster.stop, "fast")  # every connection is cut
        refused = await hosts.post(2, model_free(), "during")
        assert refused.status_code == 503  # retry with the same id once it is back
        health = await hosts.client(3).get("/courier/health")
        assert health.status_code == 503 and health.json()["ok"] is False
        await asyncio.sleep(1.0)  # running jobs keep running meanwhile
        await asyncio.to_thread(cluster.start)
        for _ in range(100):
            if (await hosts.post(2, model_free(), "during")).status_code == 202:
                break
            await asyncio.sleep(0.2)
        for cid in [*ids, "during"]:
            assert (await hosts.wait_final(1, cid, timeout=60))["state"] == "success", cid
        await settled(receiver, 10, timeout=60)
        assert_one_event_each(receiver, [(cid, 1) for cid in [*ids, "during"]])
    finally:
        await asyncio.to_thread(cluster.remove)


class FlakyReceiver:
    """A callback endpoint that answers 503 to about a third of the requests and, now and
    then, answers 200 too late (the courier counts that as not delivered: a resend)."""

    def __init__(self, seed: int = 16) -> None:
        self.random = random.Random(seed)
        self.requests: list[Received] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        from multidict import CIMultiDict

        body = await request.read()
        self.requests.append(Received(CIMultiDict(request.headers), body))
        roll = self.random.random()
        if roll < 0.3:
            return web.json_response({"ok": False}, status=503)
        if roll < 0.32:
            await asyncio.sleep(12)  # past the courier's 10 s timeout
        return web.json_response({"ok": True})

    def delivered(self) -> dict[tuple[str, int], set[str]]:
        seen: dict[tuple[str, int], set[str]] = defaultdict(set)
        for r in self.requests:
            seen[(r.json["content_request_id"], r.json["attempt"])].add(r.headers["webhook-id"])
        return seen


async def test_a_thousand_jobs_over_three_hosts_with_a_flaky_receiver(
        tmp_path, postgres_url, pg_schema):
    flaky = FlakyReceiver()
    app = web.Application()
    app.router.add_post("/callback", flaky.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    environ = {"COURIER_API_KEY": API_KEY, "COURIER_DB": postgres_url,
               "COURIER_DB_SCHEMA": pg_schema, "COURIER_CALLBACK_URL": str(server.make_url(
                   "/callback")), "COURIER_MAX_QUEUE": "5000", "COURIER_TAKEOVER_AFTER": TAKEOVER,
               "COURIER_PUBLIC_BASE_URL": "http://courier.test:8188"}
    hosts = Fleet(tmp_path, environ, API_KEY, schedule="0,0.1,0.3,1")
    try:
        hosts.start(3)
        await hosts.ready()
        ids = [f"k{i:04}" for i in range(1000)]
        gate = asyncio.Semaphore(12)

        async def post(i: int, cid: str) -> int:
            async with gate:
                return (await hosts.post(1 + i % 3, model_free(), cid)).status_code

        codes = await asyncio.gather(*(post(i, cid) for i, cid in enumerate(ids)))
        assert codes == [202] * 1000
        deadline = asyncio.get_running_loop().time() + 240
        while True:
            delivered = flaky.delivered()
            if len(delivered) == 1000:
                counts = [(await hosts.client(1).get("/courier/health")).json()["outbox"]]
                if counts[0]["pending"] == 0:
                    break
            assert asyncio.get_running_loop().time() < deadline, (
                f"{len(delivered)} of 1000 delivered")
            await asyncio.sleep(0.5)
        assert sorted(delivered) == [(cid, 1) for cid in ids]  # 0 lost
        assert all(len(events) == 1 for events in delivered.values())  # 0 duplicated finals
        statuses = [r.json["status"] for r in flaky.requests]
        assert set(statuses) == {"success"}
        spread: dict[str, int] = defaultdict(int)
        for i in (1, 2, 3):
            text = (await hosts.client(i).get("/courier/metrics")).text
            for line in text.splitlines():
                if line.startswith("courier_jobs_final_total{"):
                    spread[f"host-{i}"] += int(float(line.rsplit(" ", 1)[1]))
        assert sum(spread.values()) == 1000 and all(spread.values()), spread
    finally:
        await hosts.aclose()
        await server.close()



async def test_an_nginx_upstream_over_the_hosts_sends_work_anywhere(fleet, receiver, tmp_path):
    """deploy/nginx/comfy-courier-fleet.conf in front of two hosts and a dead address: jobs
    POSTed through it all run once, status and DELETE work through it, the dead one is
    skipped."""
    from test_reverse_proxy import CONF, NGINX, start_nginx

    from pgcluster import free_port

    if NGINX is None:
        pytest.skip("nginx is not installed (Debian: apt-get install -y nginx)")
    hosts = await fleet(2)
    conf = CONF.with_name("comfy-courier-fleet.conf")
    nginx = await asyncio.to_thread(start_nginx, tmp_path / "nginx", 0, conf, {
        "server 10.0.0.11:8188 max_fails=2": f"server 127.0.0.1:{hosts.host(1).port} max_fails=2",
        "server 10.0.0.12:8188 max_fails=2": f"server 127.0.0.1:{hosts.host(2).port} max_fails=2",
        "server 10.0.0.13:8188 max_fails=2": f"server 127.0.0.1:{free_port()} max_fails=2",
    })
    try:
        with nginx.client() as client:
            client.headers["X-API-Key"] = API_KEY
            ids = [f"lb{i}" for i in range(6)]
            for cid in ids:
                response = await asyncio.to_thread(client.post, "/execute-workflow", json={
                    "workflow_json": slow_workflow(0.2), "content_request_id": cid})
                assert response.status_code == 202, response.text
            await settled(receiver, 6)
            assert_one_event_each(receiver, [(cid, 1) for cid in ids])
            status = await asyncio.to_thread(client.get, "/execute-workflow/lb3")
            assert status.status_code == 200 and status.json()["state"] == "success"
            health = (await asyncio.to_thread(client.get, "/courier/health")).json()
            assert health["fleet"]["hosts_live"] == 2
            assert (await asyncio.to_thread(client.get, "/prompt")).status_code == 404
        assert "Connection refused" in nginx.error_log.read_text()  # tried, then skipped
    finally:
        nginx.stop()
