"""A restarted ComfyUI finishes or resubmits what the previous process left in the journal."""

from __future__ import annotations

import asyncio
import sqlite3

from comfy_courier.executor.comfy_port import Completion

from conftest import API_KEY, model_free


async def test_queued_job_is_resubmitted_after_a_restart(make_harness, tmp_path):
    first = await make_harness(start_worker=False)
    _, accepted = await first.post(model_free(), "rs1")
    first.comfy.stop()  # ComfyUI dies: its in-memory queue is gone, the journal stays

    second = await make_harness(base=tmp_path / "comfy2")
    final = await second.wait_final("rs1")
    assert final["state"] == "success" and final["attempt"] == 1
    assert final["prompt_id"] != accepted["prompt_id"]
    await second.receiver.wait_for(1)
    await second.settle()
    assert [b["status"] for b in second.receiver.bodies("rs1")] == ["success"]


def journal_row(h, cid: str) -> tuple[str, int]:
    """(state, runs) of the job's latest attempt, read straight from the journal file."""
    with sqlite3.connect(h.settings.db_path) as db:
        return db.execute("SELECT state, runs FROM jobs WHERE content_request_id = ?"
                          " ORDER BY attempt DESC LIMIT 1", (cid,)).fetchone()


def died_while_running(h, cid: str) -> None:
    """The process died while ComfyUI executed the job: its row says so."""
    h.comfy.stop()
    h.journal_sql("UPDATE jobs SET state = 'running', started_at = created_at"
                  " WHERE content_request_id = ?", cid)


async def test_job_lost_too_often_ends_in_one_error(make_harness, tmp_path):
    env = {"COURIER_MAX_ATTEMPTS": "1"}
    first = await make_harness(env=env, start_worker=False)
    await first.post(model_free(), "lost1")
    died_while_running(first, "lost1")

    second = await make_harness(env=env, base=tmp_path / "comfy2")
    final = await second.wait_final("lost1")
    assert final["state"] == "error" and final["error_type"] == "lost"
    await second.receiver.wait_for(1)
    await second.settle()
    [body] = second.receiver.bodies("lost1")
    assert body["error_type"] == "lost"
    assert "running, 1 time(s) (COURIER_MAX_ATTEMPTS=1)" in body["error_message"]


async def test_a_job_that_only_waited_survives_any_number_of_restarts(make_harness, tmp_path):
    # COURIER_MAX_ATTEMPTS stops a job that crashes ComfyUI, not the backlog behind it
    env = {"COURIER_MAX_ATTEMPTS": "1"}
    first = await make_harness(env=env, start_worker=False)
    await first.post(model_free(), "wait1")
    first.comfy.stop()
    for n in range(2, 6):  # four kill -9s while it waits in the queue
        restarted = await make_harness(env=env, base=tmp_path / f"comfy{n}", start_worker=False)
        assert (await restarted.status("wait1"))["state"] == "queued"
        assert journal_row(restarted, "wait1") == ("queued", 1)
        restarted.comfy.stop()
    last = await make_harness(env=env, base=tmp_path / "comfy6")
    final = await last.wait_final("wait1")
    assert final["state"] == "success" and final["attempt"] == 1
    await last.receiver.wait_for(1)
    await last.settle()
    assert [b["status"] for b in last.receiver.bodies("wait1")] == ["success"]


async def test_only_restarts_that_cut_a_run_short_count_against_max_attempts(make_harness,
                                                                             tmp_path):
    # with COURIER_MAX_ATTEMPTS=2: waited, ran, waited, waited, ran -> lost after 2 runs
    env = {"COURIER_MAX_ATTEMPTS": "2"}
    h = await make_harness(env=env, start_worker=False)
    await h.post(model_free(), "mix1")
    expected = []
    for n, was in enumerate(["queued", "running", "queued", "queued"], start=2):
        if was == "running":
            died_while_running(h, "mix1")
        else:
            h.comfy.stop()
        h = await make_harness(env=env, base=tmp_path / f"comfy{n}", start_worker=False)
        expected.append(journal_row(h, "mix1"))
    assert expected == [("queued", 1), ("queued", 2), ("queued", 2), ("queued", 2)]
    died_while_running(h, "mix1")
    last = await make_harness(env=env, base=tmp_path / "comfy9", start_worker=False)
    final = await last.wait_final("mix1")
    assert final["state"] == "error" and final["error_type"] == "lost"
    assert "running, 2 time(s) (COURIER_MAX_ATTEMPTS=2)" in final["error_message"]
    await last.receiver.wait_for(1)
    await last.settle()
    assert [b["error_type"] for b in last.receiver.bodies("mix1")] == ["lost"]


async def test_undelivered_callback_resumes_after_restart(make_harness, tmp_path):
    first = await make_harness(schedule=(0, 60))
    first.receiver.script = [(503, {}, 0.0)]
    await first.post(model_free(), "ob1")
    await first.receiver.wait_for(1)
    await first.settle()
    assert (await first.status("ob1"))["callback"]["state"] == "pending"
    await first.courier.stop()

    # The next process finds the pending event; make it due now instead of in 60 s.
    first.journal_sql("UPDATE outbox SET next_attempt_at = 0")
    second = await make_harness(base=tmp_path / "comfy2")
    await second.receiver.wait_for(2)
    await second.settle()
    ids = {r.headers["webhook-id"] for r in second.receiver.requests}
    assert len(ids) == 1
    assert (await second.status("ob1"))["callback"]["state"] == "delivered"


async def test_another_instance_jobs_are_left_alone(make_harness, tmp_path):
    first = await make_harness(start_worker=False)
    await first.post(model_free(), "other1")
    first.comfy.stop()
    # a sibling ComfyUI on another port shares the journal: it must not touch this job
    sibling = await make_harness(base=tmp_path / "comfy2", port=8189)
    assert (await sibling.status("other1"))["state"] == "queued"


async def test_a_prompt_ending_after_the_loop_closed_is_left_to_the_journal(make_harness):
    # ComfyUI exiting: the worker may end a prompt after the server's loop has closed.
    h = await make_harness(start_worker=False)
    _, accepted = await h.post(model_free(), "late1")
    loop, closed = h.courier.worker_events.loop, asyncio.new_event_loop()
    closed.close()
    h.courier.worker_events.loop = closed
    try:
        h.courier.worker_events.completion_from_worker(Completion(accepted["prompt_id"], "success"))
        h.courier.worker_events.start_from_worker(accepted["prompt_id"])
        h.courier.worker_events.loop = None  # and a UI run before the courier started
        h.courier.worker_events.start_from_worker(accepted["prompt_id"])
    finally:
        h.courier.worker_events.loop = loop
    assert (await h.status("late1"))["state"] == "queued"  # the next start recovers it


async def test_a_job_that_ends_during_a_recovery_pass_stays_ended(make_harness):
    # recover() reads the unfinished jobs once: "r1" is on the list, then is cancelled while
    # an orphan ahead of it is being resubmitted; its turn must not bring it back
    h = await make_harness(start_worker=False)
    await h.post(model_free(), "r1")
    h.journal_sql(
        "INSERT INTO jobs (content_request_id, attempt, prompt_id, instance, state, workflow,"
        " fingerprint, runs, created_at) SELECT 'orphan1', 1, 'orphan-p', instance, 'queued',"
        " workflow, fingerprint, 1, created_at - 10 FROM jobs WHERE content_request_id = 'r1'")
    gate, entered = asyncio.Event(), asyncio.Event()
    validated = h.courier.queue.validated_prompt

    async def held_validation(job, workflow):
        if job.content_request_id == "orphan1":
            entered.set()
            await gate.wait()
        return await validated(job, workflow)

    h.courier.queue.validated_prompt = held_validation
    recovery = asyncio.ensure_future(h.courier.recover())
    await entered.wait()
    assert (await h.courier.cancel("r1"))["state"] == "error"
    gate.set()
    await recovery
    assert (await h.status("r1"))["state"] == "error"
    [orphan] = [run.job for run in h.courier.runs.by_prompt.values()]  # r1 is not running again
    assert orphan.content_request_id == "orphan1"
    assert [item[1] for item in h.comfy.prompt_queue.queue] == [orphan.prompt_id]
    await h.receiver.wait_for(1)
    await h.settle()
    assert [b["error_type"] for b in h.receiver.bodies("r1")] == ["cancelled"]


async def test_a_delete_that_reaches_a_sibling_instance_cancels_the_job(make_harness, tmp_path):
    # one ComfyUI per GPU behind one address: the DELETE may land on the other one
    owner = await make_harness(start_worker=False)
    await owner.post(model_free(), "sib1")
    sibling = await make_harness(base=tmp_path / "comfy2", port=8189, start_worker=False)
    resp = await sibling.client.delete("/execute-workflow/sib1", headers={"X-API-Key": API_KEY})
    assert resp.status == 202 and (await resp.json())["state"] == "queued"
    final = await sibling.wait_final("sib1")  # the owner's queue watch reads it within 2 s
    assert final["error_type"] == "cancelled"
    assert owner.comfy.prompt_queue.get_tasks_remaining() == 0
    await owner.receiver.wait_for(1)
    await owner.settle()
    assert [b["error_type"] for b in owner.receiver.bodies("sib1")] == ["cancelled"]
    resp = await sibling.client.delete("/execute-workflow/sib1", headers={"X-API-Key": API_KEY})
    assert resp.status == 409


async def test_a_cancelled_job_whose_uploads_cannot_resume_is_not_run_again(make_harness,
                                                                            tmp_path):
    first = await make_harness(start_worker=False)
    await first.post(model_free(), "cu2")
    first.comfy.stop()  # died while uploading, after a DELETE; its saved file is gone
    first.journal_sql("UPDATE jobs SET state = 'uploading', cancel_requested = 1,"
                      " expected_images = 1 WHERE content_request_id = 'cu2'")
    second = await make_harness(base=tmp_path / "comfy2", start_worker=False)
    final = await second.wait_final("cu2")
    assert final["error_type"] == "cancelled"
    assert second.comfy.prompt_queue.get_tasks_remaining() == 0


async def test_after_a_store_outage_no_host_is_taken_over_until_all_could_beat_again(
        make_harness, monkeypatch):
    """When the store was down, every host's heartbeat was failing: the first to get through
    must not take the others over before they have had COURIER_TAKEOVER_AFTER to beat."""
    from comfy_courier.executor.errors import StoreError

    h = await make_harness(env={"COURIER_TAKEOVER_AFTER": "1"})
    recovery, store = h.courier.recovery, h.courier.store
    now = [1000.0]
    recovery.clock = lambda: now[0]
    beats: list[str] = []
    adoptions: list[float] = []
    down = [True]
    real_heartbeat = store.heartbeat

    async def heartbeat(instance, at):
        if down[0]:
            beats.append("failed")
            raise StoreError("journal: the database is restarting")
        beats.append("ok")
        await real_heartbeat(instance, at)

    async def adopt_stale(instance, at, stale_after):
        adoptions.append(at)
        return []

    monkeypatch.setattr(store, "heartbeat", heartbeat)
    monkeypatch.setattr(store, "adopt_stale", adopt_stale)

    async def until(predicate):
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(until(lambda: beats.count("failed") >= 2), 10)
    down[0] = False
    await asyncio.wait_for(until(lambda: beats.count("ok") >= 3), 10)
    assert adoptions == []  # back for less than COURIER_TAKEOVER_AFTER (by the clock)
    now[0] += 1.0
    await asyncio.wait_for(until(lambda: adoptions), 10)
    assert adoptions[0] == 1001.0
