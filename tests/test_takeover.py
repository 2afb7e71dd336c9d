"""A whole instance stalls (SIGSTOP) past COURIER_TAKEOVER_AFTER while its sibling shares
the journal (issue 15, item 2): the sibling takes the job over and delivers it; when the
stalled one continues, it is fenced: no second final event, no overwritten object."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import API_KEY, CALLBACK_KEY, SERVICE_KEY
from pgcluster import free_port
from test_fault_injection import assert_one_event_each
from test_job_outcomes import slow_workflow

REPO = Path(__file__).resolve().parents[1]


async def poll(predicate, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


async def test_a_stalled_instance_is_taken_over_and_fenced(make_harness, receiver,
                                                           storage_server, tmp_path):
    env = {
        "COURIER_API_KEY": API_KEY, "COURIER_DB": str(tmp_path / "journal.sqlite3"),
        "COURIER_CALLBACK_URL": receiver.url, "COURIER_CALLBACK_API_KEY": CALLBACK_KEY,
        "SUPABASE_URL": storage_server.url, "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
        "COURIER_TAKEOVER_AFTER": "1",
    }
    port = free_port()
    log = (tmp_path / "a.log").open("wb")
    stalled = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "standin_server.py"), "--port", str(port),
         "--base", str(tmp_path / "a")],
        env={**os.environ, **env, "COURIER_INSTANCE": "gpu-a"}, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": API_KEY}) as a:
            async def a_up() -> bool:
                try:
                    return (await a.get("/courier/health")).json()["ready"]
                except httpx.HTTPError:
                    return False

            await poll(a_up)
            # stuck in I/O: the stalled run goes on to the end once it continues
            workflow = slow_workflow(1.5, blocking=True)
            accepted = await a.post("/execute-workflow", json={
                "workflow_json": workflow, "content_request_id": "stall1"})
            assert accepted.status_code == 202

            async def running() -> bool:
                return (await a.get("/execute-workflow/stall1")).json()["state"] == "running"

            await poll(running)
            os.kill(stalled.pid, signal.SIGSTOP)

            sibling = await make_harness(env={**env, "COURIER_INSTANCE": "gpu-b"},
                                         base=tmp_path / "b", port=8191)
            [body] = [r.json for r in await receiver.wait_for(1, timeout=30)]
            assert body["status"] == "success"
            assert body["image_url"].endswith("/stall1/1_2-1.jpg")  # the takeover's own key
            delivered = dict(storage_server.state.objects)

            os.kill(stalled.pid, signal.SIGCONT)
            fenced = tmp_path / "a.log"
            await poll(lambda: _contains(fenced, b"fenced id=stall1"), timeout=20)
            await asyncio.sleep(2.0)  # the stalled run's node returns and ends meanwhile
            await sibling.settle()
            assert_one_event_each(receiver, [("stall1", 1)])
            assert len(receiver.requests) == 1
            # nothing the takeover delivered was overwritten
            for key, stored in delivered.items():
                assert storage_server.state.objects[key] == stored
            uploads = [u.path for u in storage_server.state.uploads]
            assert uploads.count("stall1/1_2-1.jpg") == 1
            status = (await a.get("/execute-workflow/stall1")).json()
            assert status["state"] == "success" and status["image_url"] == body["image_url"]
    finally:
        stalled.send_signal(signal.SIGCONT)
        stalled.terminate()
        stalled.wait(timeout=20)
        log.close()


async def _contains(path: Path, text: bytes) -> bool:
    return text in path.read_bytes()


async def test_a_second_live_process_with_one_instance_name_stands_by_until_the_name_is_free(
        make_harness, tmp_path, caplog):
    """Jobs are known by instance name: a twin that accepted jobs could have them run again
    by the holder's recovery (after it adopts a dead third instance), and would resubmit
    the holder's. So the twin accepts nothing until the holder is gone, then takes over."""
    from test_job_outcomes import slow_workflow as slow

    env = {"COURIER_INSTANCE": "same-name", "COURIER_TAKEOVER_AFTER": "2"}  # beats 0.5 s apart
    first = await make_harness(env=env, start_worker=False)
    status, _ = await first.post(slow(0.1), "twin1")
    assert status == 202
    twin = await make_harness(env=env, base=tmp_path / "comfy2", port=8191)
    assert twin.courier.twin and not first.courier.twin
    assert not twin.courier.ready.is_set()
    status, body = await twin.post(slow(0.1), "twin2")
    assert status == 503
    assert "another live process runs under this comfy-courier's instance name" in (
        body["error"]["message"])
    assert "same-name" not in body["error"]["message"]  # the answer names no host
    assert twin.comfy.prompt_queue.get_tasks_remaining() == 0  # twin1 is not run here
    assert first.comfy.prompt_queue.get_tasks_remaining() == 1
    health = await twin.courier.health()
    assert health["instance_name_shared"] and health["config_problems"] >= 1
    assert not health["ready"]
    assert "another live process runs as instance 'same-name'" in caplog.text

    # once the first is gone (its lock with it), the one standing by recovers its work
    await first.courier.stop()
    first.comfy.stop()
    await asyncio.wait_for(twin.courier.ready.wait(), timeout=10)
    assert not twin.courier.twin
    assert (await twin.wait_final("twin1"))["state"] == "success"
    assert "instance 'same-name' is free again" in caplog.text
    health = await twin.courier.health()
    assert not health["instance_name_shared"] and health["ready"]
    status, _ = await twin.post(slow(0.1), "twin2")
    assert status == 202
    assert (await twin.wait_final("twin2"))["state"] == "success"
    assert_one_event_each(twin.receiver, [("twin1", 1), ("twin2", 1)])
