"""Faults on every side; the invariant each time: every accepted attempt gets exactly one
final event (one webhook-id), delivered at least once once the receiver is reachable."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from conftest import SERVICE_KEY, model_free


def events_by_attempt(receiver) -> dict[tuple[str, int], set[str]]:
    """(content_request_id, attempt) -> the webhook-ids delivered for it."""
    seen: dict[tuple[str, int], set[str]] = defaultdict(set)
    for request in receiver.requests:
        body = request.json
        seen[(body["content_request_id"], body["attempt"])].add(request.headers["webhook-id"])
    return seen


def assert_one_event_each(receiver, accepted: list[tuple[str, int]]) -> None:
    seen = events_by_attempt(receiver)
    assert sorted(seen) == sorted(accepted), "every accepted attempt, and nothing else"
    assert all(len(ids) == 1 for ids in seen.values()), seen


async def test_receiver_down_then_back_across_a_restart(make_harness, tmp_path, receiver):
    first = await make_harness(schedule=(0, 0.05, 30))
    receiver.script = [(503, {}, 0.0)] * 4
    for cid in ("down1", "down2"):
        await first.post(model_free(), cid)
    await receiver.wait_for(4)  # both events tried twice, both failed
    await first.settle()
    await first.courier.stop()
    first.comfy.stop()

    # The process dies; the next one (same instance) resumes the outbox when events are due.
    first.journal_sql("UPDATE outbox SET next_attempt_at = 0")
    second = await make_harness(base=tmp_path / "comfy2")
    await receiver.wait_for(6)
    await second.settle()
    assert_one_event_each(receiver, [("down1", 1), ("down2", 1)])
    assert [r.json["status"] for r in receiver.requests[-2:]] == ["success", "success"]


async def test_receiver_slower_than_the_attempt_timeout_gets_a_retry(make_harness, receiver):
    h = await make_harness(schedule=(0, 0.05))
    h.courier.deliverer._timeout = 0.2
    h.courier.deliverer._client = None
    receiver.script = [(200, {}, 0.5)]  # answers too late: counted as not delivered
    await h.post(model_free(), "slow1")
    await receiver.wait_for(2)
    await h.settle()
    assert_one_event_each(receiver, [("slow1", 1)])
    assert len(receiver.requests) == 2  # the only duplicate: the attempt that timed out
    assert (await h.status("slow1"))["callback"]["state"] == "delivered"


async def test_receiver_401_is_retried_until_fixed_and_other_jobs_still_deliver(make_harness,
                                                                                receiver):
    # a wrong key at the receiver: its operator fixes it, and the refused event arrives
    h = await make_harness()
    receiver.script = [(401, {}, 0.0), (400, {}, 0.0)]
    await h.post(model_free(), "bad1")
    await receiver.wait_for(2)
    await h.post(model_free(), "good1")
    await receiver.wait_for(4)
    await h.settle()
    assert (await h.status("bad1"))["callback"] == {"state": "delivered", "attempts": 3,
                                                     "last_error": None}
    assert (await h.status("good1"))["callback"]["state"] == "delivered"
    assert_one_event_each(receiver, [("bad1", 1), ("good1", 1)])


async def test_crash_while_uploading_finishes_from_saved_files(make_harness, storage_server,
                                                              tmp_path, receiver):
    env = {"SUPABASE_URL": storage_server.url, "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY}
    first = await make_harness(env=env)
    workflow = model_free()
    workflow["1"]["inputs"]["batch_size"] = 2
    storage_server.state.hang_uploads = True  # uploads never answer: the process dies waiting
    await first.post(workflow, "upl1")
    await first.wait_state("upl1", "uploading")
    await first.courier.stop()
    first.comfy.stop()
    storage_server.state.release()
    uploaded_before = storage_server.state.upload_count

    second = await make_harness(env=env, base=tmp_path / "comfy2")
    final = await second.wait_final("upl1")
    assert final["state"] == "success" and len(final["image_urls"]) == 2
    assert final["prompt_id"] is not None
    assert second.comfy.prompt_queue.get_tasks_remaining() == 0, "not run again"
    assert storage_server.state.upload_count - uploaded_before == 2
    await receiver.wait_for(1)
    await second.settle()
    assert_one_event_each(receiver, [("upl1", 1)])


async def test_storage_refusing_connections_ends_in_upload_error(make_harness, receiver):
    h = await make_harness(env={"SUPABASE_URL": "http://127.0.0.1:9",
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    await h.post(model_free(), "refused1")
    await receiver.wait_for(1)
    await h.settle()
    [body] = receiver.bodies("refused1")
    assert body["status"] == "error" and body["error_type"] == "upload"
    assert "unreachable" in body["error_message"]


async def test_storage_timeout_is_retried_then_succeeds(make_harness, storage_server, receiver):
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    h.courier.storage._timeout = 0.3
    storage_server.state.drop_next(1)  # the connection dies mid-request
    storage_server.state.fail_next(1, status=502)
    await h.post(model_free(), "flaky1")
    await receiver.wait_for(1)
    await h.settle()
    [body] = receiver.bodies("flaky1")
    assert body["status"] == "success"
    assert storage_server.state.upload_count == 3


async def test_two_processes_sharing_a_journal_race_one_id(make_harness, tmp_path, receiver):
    a = await make_harness(start_worker=False, port=8188)
    b = await make_harness(start_worker=False, port=8189, base=tmp_path / "comfy2")
    results = await asyncio.gather(*(h.post(model_free(), "shared1") for h in (a, b, a, b)))
    statuses = sorted(status for status, _ in results)
    assert statuses.count(202) == 1 and set(statuses) <= {200, 202, 409}, statuses
    queued = (a.comfy.prompt_queue.get_tasks_remaining()
              + b.comfy.prompt_queue.get_tasks_remaining())
    assert queued == 1


async def test_many_jobs_with_a_flaky_receiver_lose_nothing(make_harness, receiver):
    h = await make_harness(schedule=(0, 0.01, 0.02), env={"COURIER_MAX_QUEUE": "500"})
    receiver.script = [(503, {}, 0.0) if i % 3 == 0 else (200, {}, 0.0) for i in range(400)]
    cids = [f"load{i}" for i in range(60)]
    for cid in cids:
        status, _ = await h.post(model_free(), cid)
        assert status == 202
    for cid in cids:
        await h.wait_final(cid, timeout=30)
    for _ in range(200):
        await h.settle()
        states = {(await h.status(c))["callback"]["state"] for c in cids}
        if states == {"delivered"}:
            break
        await asyncio.sleep(0.02)
    assert_one_event_each(receiver, [(c, 1) for c in cids])


async def test_a_journal_write_failing_once_is_retried_not_reported(make_harness, receiver,
                                                                   monkeypatch):
    import sqlite3

    from comfy_courier.executor import settle as courier_module
    from comfy_courier.executor.store.sqlite.journal import Journal

    monkeypatch.setattr(courier_module, "JOURNAL_RETRY", (0.01, 0.01))
    real_finish, calls = Journal.finish, []

    def flaky_finish(self, job, event):
        calls.append(job.state)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return real_finish(self, job, event)

    monkeypatch.setattr(Journal, "finish", flaky_finish)
    h = await make_harness(journal_thread=True)
    await h.post(model_free(), "jf1")
    await receiver.wait_for(1)
    await h.settle()
    assert [b["status"] for b in receiver.bodies("jf1")] == ["success"]
    assert len(calls) == 2


async def test_cancelled_while_running_is_not_rerun_after_a_restart(make_harness, tmp_path,
                                                                   receiver):
    from test_job_outcomes import slow_workflow

    first = await make_harness()
    await first.post(slow_workflow(30, blocking=True), "cx1")
    await first.wait_state("cx1", "running")
    resp = await first.client.delete("/execute-workflow/cx1", headers={"X-API-Key": "x"})
    assert resp.status == 401
    from conftest import API_KEY

    resp = await first.client.delete("/execute-workflow/cx1", headers={"X-API-Key": API_KEY})
    assert resp.status == 202
    await first.courier.stop()  # ComfyUI dies before the stuck node returns

    second = await make_harness(base=tmp_path / "comfy2")
    final = await second.wait_final("cx1")
    assert final["error_type"] == "cancelled"
    assert second.comfy.prompt_queue.get_tasks_remaining() == 0
    await receiver.wait_for(1)
    await second.settle()
    assert [b["error_type"] for b in receiver.bodies("cx1")] == ["cancelled"]


async def test_work_of_a_silent_instance_is_adopted(make_harness, tmp_path, receiver):

    gone = await make_harness(start_worker=False, port=8190)  # e.g. a recreated container
    await gone.post(model_free(), "orphan1")
    await gone.courier.stop()
    gone.comfy.stop()
    await gone.courier.store.heartbeat(gone.courier.instance, 0.0)  # long silent

    live = await make_harness(base=tmp_path / "comfy2", port=8191)
    final = await live.wait_final("orphan1")
    assert final["state"] == "success"
    await receiver.wait_for(1)
    await live.settle()
    assert_one_event_each(receiver, [("orphan1", 1)])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_dead_comfy_worker_ends_queued_jobs_as_lost(make_harness, receiver):
    h = await make_harness(version="0.33.0")
    # another extension puts an old-shape item on a 0.33 queue: ComfyUI's worker dies on it
    h.comfy.prompt_queue.put((-1, "broken", {}, {}, []))
    for _ in range(200):
        if not h.comfy.worker_alive:
            break
        await asyncio.sleep(0.01)
    assert not h.comfy.worker_alive
    await h.post(model_free(), "dead1")
    await receiver.wait_for(1)
    await h.settle()
    [body] = receiver.bodies("dead1")
    assert body["error_type"] == "lost" and "worker" in body["error_message"]
