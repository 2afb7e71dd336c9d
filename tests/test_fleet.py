"""Several hosts on one Postgres store, in one process (two stand-in ComfyUIs): work goes
to the idle host, any host answers status and DELETE, the queue limit counts the fleet's
waiting jobs, and a dead host's jobs are run again elsewhere. The same with separate
processes (kill -9, SIGSTOP, a database restart) is in test_fleet_processes.py."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from comfy_courier import wiring
from comfy_courier.executor import watch
from comfy_courier.executor.comfy_port import Validation
from comfy_courier.nodes import save_and_callback

from conftest import API_KEY, model_free
from test_fault_injection import assert_one_event_each
from test_job_outcomes import slow_workflow


@pytest.fixture
def fleet(make_harness, postgres_url, pg_schema, tmp_path, monkeypatch):
    """fleet(n, **env): n hosts (stand-in ComfyUIs with their couriers) on one schema.

    In ComfyUI the node finds its process's one courier; here each stand-in's worker
    thread finds its own host's."""
    runtimes: dict[threading.Thread, wiring.Runtime] = {}
    monkeypatch.setattr(save_and_callback, "current_runtime",
                        lambda: runtimes.get(threading.current_thread(), wiring._runtime))

    async def make(n: int = 2, **env: str) -> list[Any]:
        hosts = []
        for i in range(1, n + 1):
            host = await make_harness(
                env={"COURIER_DB": postgres_url, "COURIER_DB_SCHEMA": pg_schema,
                     "COURIER_INSTANCE": f"gpu-{i}", **env},
                base=tmp_path / f"host{i}", port=8187 + i)
            runtimes[host.comfy._thread] = wiring.Runtime(
                host.settings, host.courier.comfy, host.courier, asyncio.get_running_loop())
            hosts.append(host)
        return hosts

    return make


def ran_on(host, prompt_id: str) -> bool:
    return prompt_id in host.comfy.prompt_queue.history


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def test_a_busy_host_leaves_new_jobs_to_the_idle_one(fleet, receiver):
    one, two = await fleet(2)
    status, long = await one.post(slow_workflow(1.5), "long")
    assert status == 202
    await one.wait_state("long", "running")
    status, short = await one.post(model_free(), "short")
    assert status == 202 and short["state"] == "queued"
    assert short["queue_position"] == 0  # first in the fleet's line
    final = await two.wait_final("short")
    assert final["state"] == "success"
    assert (await one.status("long"))["state"] == "running"  # short ended first
    assert ran_on(two, short["prompt_id"]) and not ran_on(one, short["prompt_id"])
    assert (await one.wait_final("long"))["state"] == "success"
    assert ran_on(one, long["prompt_id"])
    await receiver.wait_for(2)
    await one.settle()
    await two.settle()
    assert_one_event_each(receiver, [("long", 1), ("short", 1)])


async def test_waiting_jobs_run_oldest_first_when_a_host_frees(fleet, receiver):
    [one] = await fleet(1)
    _, first = await one.post(slow_workflow(0.5), "first")
    prompts = {first["prompt_id"]: "first"}
    for cid in ("w1", "w2", "w3"):
        status, body = await one.post(model_free(), cid)
        assert status == 202 and body["state"] == "queued"
        prompts[body["prompt_id"]] = cid
    assert (await one.status("w3"))["queue_position"] == 2  # two wait ahead of it
    for cid in ("first", "w1", "w2", "w3"):
        assert (await one.wait_final(cid))["state"] == "success"
    # the order ComfyUI ran them in (callbacks of jobs ending in the same millisecond
    # are sent side by side and may arrive in either order)
    ran = [prompts[p] for p in one.comfy.prompt_queue.history if p in prompts]
    assert ran == ["first", "w1", "w2", "w3"]
    await receiver.wait_for(4)


async def test_any_host_answers_status_and_cancels_a_waiting_job(fleet, receiver):
    one, two = await fleet(2)
    await one.post(slow_workflow(1.0), "busy1")
    await two.post(slow_workflow(1.0), "busy2")
    await one.wait_state("busy1", "running")
    await two.wait_state("busy2", "running")
    status, waiting = await one.post(model_free(), "waits")
    assert status == 202
    seen = await two.status("waits")  # from the other host
    assert (seen["state"], seen["prompt_id"], seen["queue_position"]) == (
        "queued", waiting["prompt_id"], 0)
    resp = await two.client.delete("/execute-workflow/waits", headers={"X-API-Key": API_KEY})
    assert resp.status == 202
    body = await resp.json()
    assert body["state"] == "error" and body["error_type"] == "cancelled"
    await one.wait_final("busy1")
    await two.wait_final("busy2")
    await receiver.wait_for(3)
    await one.settle()
    await two.settle()
    assert_one_event_each(receiver, [("busy1", 1), ("busy2", 1), ("waits", 1)])
    [cancelled] = receiver.bodies("waits")
    assert cancelled["error_type"] == "cancelled"
    assert not ran_on(one, waiting["prompt_id"]) and not ran_on(two, waiting["prompt_id"])


async def test_a_delete_reaches_the_host_running_the_job_by_notice(fleet, receiver,
                                                                  monkeypatch):
    monkeypatch.setattr(watch, "CANCEL_POLL_TICKS", 10**9)  # no poll: only the notice
    one, two = await fleet(2)
    await one.post(slow_workflow(30), "stopme")
    await one.wait_state("stopme", "running")
    resp = await two.client.delete("/execute-workflow/stopme", headers={"X-API-Key": API_KEY})
    assert resp.status == 202
    final = await one.wait_final("stopme", timeout=5)
    assert final["error_type"] == "cancelled"
    assert final["error_message"] == "cancelled while running (DELETE request)"


async def test_the_queue_limit_counts_the_fleets_waiting_jobs(fleet):
    one, two = await fleet(2, COURIER_MAX_QUEUE="3")
    await one.post(slow_workflow(1.0), "run1")
    await two.post(slow_workflow(1.0), "run2")
    await one.wait_state("run1", "running")
    await two.wait_state("run2", "running")
    for cid in ("w1", "w2"):
        assert (await one.post(model_free(), cid))[0] == 202
    await until(lambda: two.courier.claims.waiting == 2)  # told by the store's notices
    status, body = await two.post(model_free(), "over")
    assert status == 429 and body["error"]["type"] == "queue_full"
    assert (await two.post(model_free(), "w1"))[0] == 200  # a replay is still answered


async def test_a_host_that_cannot_validate_a_claimed_job_ends_it_naming_itself(
        fleet, receiver, monkeypatch):
    one, two = await fleet(2)

    async def missing_node(prompt_id, prompt):
        return Validation(False, {"type": "missing_node_type", "message": "Node 'SlowNode'"
                                  " not found", "details": "", "extra_info": {}}, [], {})

    await one.post(slow_workflow(1.0), "busy")
    await one.wait_state("busy", "running")
    monkeypatch.setattr(two.courier.queue.comfy, "validate", missing_node)
    status, _ = await one.post(slow_workflow(0.1), "elsewhere")
    assert status == 202  # valid where it was accepted
    final = await one.wait_final("elsewhere")
    assert final["error_type"] == "validation"
    assert final["error_message"] == (
        "failed validation on host gpu-2: Node 'SlowNode' not found")


async def test_health_and_metrics_show_the_fleet(fleet):
    one, two = await fleet(2)
    await one.post(slow_workflow(1.0), "busy1")
    await two.post(slow_workflow(1.0), "busy2")
    await one.wait_state("busy1", "running")
    await two.wait_state("busy2", "running")
    await one.post(model_free(), "waits")
    health = await (await two.client.get("/courier/health")).json()
    assert health["fleet"] == {"hosts_live": 2, "waiting": 1}
    assert "gpu-" not in str(health)  # no host names on the unauthenticated route
    text = await (await one.client.get("/courier/metrics",
                                       headers={"X-API-Key": API_KEY})).text()
    assert 'courier_jobs_accepted_total{host="gpu-1"} 2.0' in text
    assert "courier_fleet_hosts_live 2.0" in text
    assert "courier_fleet_jobs_waiting 1.0" in text


async def test_a_dead_hosts_job_runs_again_on_a_live_host(fleet, receiver):
    one, two = await fleet(2, COURIER_TAKEOVER_AFTER="1")
    _, accepted = await one.post(slow_workflow(3, blocking=True), "orphan")
    await one.wait_state("orphan", "running")
    # gpu-1 dies: nothing of it runs any more (its worker's report would be lost too)
    one.courier.worker_events.loop = None
    await one.courier.stop()
    final = await two.wait_final("orphan", timeout=20)
    assert final["state"] == "success"
    assert final["attempt"] == 1 and final["prompt_id"] != accepted["prompt_id"]
    assert ran_on(two, final["prompt_id"])
    await receiver.wait_for(1)
    await two.settle()
    assert_one_event_each(receiver, [("orphan", 1)])


async def test_a_dead_hosts_pending_callback_goes_out_from_a_live_host(fleet, receiver):
    receiver.script = [(503, {}, 0.0)]
    one, two = await fleet(2, COURIER_TAKEOVER_AFTER="1")
    one.courier.deliverer._schedule = (0, 1.0)  # the retry is due a second later
    await one.post(model_free(), "undelivered")
    await receiver.wait_for(1)
    await one.settle()
    first = receiver.requests[0].headers["webhook-id"]
    await one.courier.stop()  # dies with the callback pending: gpu-2 sends it when due
    [_, again] = await receiver.wait_for(2, timeout=20)
    assert again.headers["webhook-id"] == first and again.json["status"] == "success"
    await two.settle()
    assert (await two.status("undelivered"))["callback"]["state"] == "delivered"


async def test_a_host_whose_worker_died_claims_nothing(fleet, receiver):
    one, two = await fleet(2)
    two.comfy.stop()  # its prompt worker thread is gone: nothing queued there would run
    await one.post(slow_workflow(0.5), "busy")
    await one.wait_state("busy", "running")
    _, waiting = await one.post(model_free(), "later")
    await two.courier.claims.once()  # asked to claim: it takes nothing
    assert (await one.wait_final("later"))["state"] == "success"
    assert ran_on(one, waiting["prompt_id"])
