"""Faults on every side; the invariant each time: every accepted attempt gets exactly one
final event (one webhook-id), delivered at least once once the receiver is reachable."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import defaultdict

import pytest

from comfy_courier.executor.errors import StoreError

from conftest import API_KEY, SERVICE_KEY, model_free


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
    h.courier.deliverer.sender.timeout = 0.2  # before its first callback opens the session
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


# -- issue 15: nothing lost, round 2 -----------------------------------------------------


async def wait_for_metric(h, line: str, tries: int = 500) -> str:
    """The metrics text once it has `line` (the counter is bumped by a background task)."""
    for _ in range(tries):
        resp = await h.client.get("/courier/metrics", headers={"X-API-Key": API_KEY})
        text = await resp.text()
        if line in text.splitlines():
            return text
        await asyncio.sleep(0.01)
    raise AssertionError(f"{line!r} not in metrics:\n{text}")


async def callback_state(h, cid: str, state: str, tries: int = 1000) -> dict:
    for _ in range(tries):
        body = await h.status(cid)
        if body["callback"]["state"] == state:
            return body["callback"]
        await asyncio.sleep(0.01)
    raise AssertionError(f"callback of {cid} never {state}: {body['callback']}")


async def test_a_delivery_the_journal_cannot_record_is_not_resent_in_a_tight_loop(
        make_harness, receiver, monkeypatch):
    # (4) the disk is full when the receiver's 200 is to be recorded: the old deliverer
    # found the row still due and sent it again at once, hundreds of times a second
    import sqlite3

    from comfy_courier.executor.store.sqlite.journal import Journal

    real = Journal.record_delivery
    refused: list[str] = []

    def record_delivery(self, event_id, state, *args):
        if state == "delivered" and len(refused) < 1:
            refused.append(event_id)
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, event_id, state, *args)

    monkeypatch.setattr(Journal, "record_delivery", record_delivery)
    h = await make_harness(journal_thread=True)
    await h.post(model_free(), "full1")
    await receiver.wait_for(1)
    for _ in range(5):
        await h.settle()
    assert len(receiver.requests) == 1, "sent again although the receiver had it"
    # the refused outcome is written again a second later, without another send
    callback = await callback_state(h, "full1", "delivered")
    assert callback["attempts"] == 1 and refused and len(receiver.requests) == 1


async def test_an_unusable_retry_after_does_not_resend_at_once(make_harness, receiver):
    # (4) "²".isdigit() is True and float("²") raises: the old deliverer re-sent at once
    h = await make_harness(schedule=(0, 3600))
    receiver.script = [(503, {"Retry-After": "²"}, 0.0)] * 50
    await h.post(model_free(), "sq1")
    await receiver.wait_for(1)
    for _ in range(5):
        await h.settle()
    assert len(receiver.requests) == 1
    callback = (await h.status("sq1"))["callback"]
    assert callback == {"state": "pending", "attempts": 1, "last_error": "HTTP 503"}


async def test_a_lost_journal_answer_at_a_jobs_end_still_calls_back_within_seconds(
        make_harness, receiver, monkeypatch):
    # (5) the final state and its event are committed, the answer is lost: the retry finds
    # the job final and sends nothing; the old deliverer slept until its next due time
    # (an hour when idle)
    import sqlite3

    from comfy_courier.executor import settle as settle_module
    from comfy_courier.executor.store.sqlite.journal import Journal

    monkeypatch.setattr(settle_module, "JOURNAL_RETRY", (0.01, 0.01))
    real_finish, calls = Journal.finish, []

    def finish_then_lose_the_answer(self, job, event):
        calls.append(job.state)
        written = real_finish(self, job, event)
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return written

    monkeypatch.setattr(Journal, "finish", finish_then_lose_the_answer)
    h = await make_harness(journal_thread=True)
    await h.post(model_free(), "lost1")
    assert (await h.wait_final("lost1"))["state"] == "success"
    await receiver.wait_for(1, timeout=10)
    await h.settle()
    assert [b["status"] for b in receiver.bodies("lost1")] == ["success"]
    assert len(calls) == 2  # the retry found it written


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP/SIGKILL are POSIX")
async def test_a_journal_process_lost_mid_call_makes_the_deliverer_look_again(
        make_harness, receiver):
    # (5) Courier.journal_lost: an event the journal committed but never confirmed is due
    # and nothing else tells the deliverer, which sleeps until its next known time (1 h)
    h = await make_harness(schedule=(0, 3600))
    receiver.script = [(503, {}, 0.0)]
    await h.post(model_free(), "jl2")
    await receiver.wait_for(1)
    await h.settle()
    db = h.courier.store.runner
    quiet = 0
    while quiet < 60:  # no journal call for 0.3 s: the deliverer sleeps its hour
        quiet = quiet + 1 if not db._inflight else 0
        await asyncio.sleep(0.005)
    h.journal_sql("UPDATE outbox SET next_attempt_at = 0")  # due now, and nobody says so
    os.kill(db.pid, signal.SIGSTOP)
    call = asyncio.ensure_future(h.courier.store.latest("jl2"))
    for _ in range(1000):
        if db._inflight:
            break
        await asyncio.sleep(0.001)
    os.kill(db.pid, signal.SIGKILL)
    with pytest.raises(StoreError):
        await call
    await receiver.wait_for(2, timeout=10)
    await h.settle()
    assert [b["status"] for b in receiver.bodies("jl2")] == ["success", "success"]
    assert (await h.status("jl2"))["callback"]["state"] == "delivered"


async def test_a_superseded_callback_waiting_for_a_slot_is_never_sent_and_is_counted(
        make_harness, receiver):
    # (8) attempt 1's error waits for a delivery slot; attempt 2 is accepted meanwhile:
    # attempt 1's callback must not go out after that, and the metric and log say so
    h = await make_harness(start_worker=False)
    slots = h.courier.deliverer._slots
    taken = 0
    while not slots.locked():  # every slot busy, as with a slow receiver
        await slots.acquire()
        taken += 1
    await h.post(model_free(), "sup1")
    resp = await h.client.delete("/execute-workflow/sup1", headers={"X-API-Key": API_KEY})
    assert resp.status == 202
    assert (await h.wait_final("sup1"))["error_type"] == "cancelled"
    status, body = await h.post(model_free(), "sup1")
    assert status == 202 and body["attempt"] == 2
    h.comfy.start(asyncio.get_running_loop())
    final = await h.wait_final("sup1")
    assert (final["state"], final["attempt"]) == ("success", 2)
    await wait_for_metric(h, "courier_callbacks_superseded_total 1.0")
    for _ in range(taken):
        slots.release()
    await receiver.wait_for(1)
    await h.settle()
    assert [(b["attempt"], b["status"]) for b in receiver.bodies("sup1")] == [(2, "success")]
