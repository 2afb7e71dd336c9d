"""The store failing at a job's end (issue 15, items 1 and 6): a locked or full journal,
a journal process that stops or dies while the end is written. Whatever it does, the job
ends in exactly one final callback once the journal answers again, and its place under
COURIER_MAX_QUEUE frees."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3

from comfy_courier.executor import settle, uploads
from comfy_courier.executor.store.sqlite.journal import Journal
from comfy_courier.executor.store.sqlite.process import JournalProcess

from conftest import SERVICE_KEY, model_free
from test_fault_injection import assert_one_event_each


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def failing(method, times: int, error: str = "database is locked"):
    """`method` that raises an sqlite3 error its first `times` calls, then works."""
    calls: list[object] = []

    def wrapper(self, *args, **kwargs):
        calls.append(args)
        if len(calls) <= times:
            raise sqlite3.OperationalError(error)
        return method(self, *args, **kwargs)

    wrapper.calls = calls  # type: ignore[attr-defined]
    return wrapper


async def test_a_final_write_failing_past_its_quick_tries_still_ends_in_one_callback(
        make_harness, receiver, monkeypatch):
    monkeypatch.setattr(settle, "JOURNAL_RETRY", (0.01, 0.01))
    monkeypatch.setattr(settle, "STUCK_RETRY_MAX", 0.05)
    finish = failing(Journal.finish, 6, "database or disk is full")
    monkeypatch.setattr(Journal, "finish", finish)
    h = await make_harness(journal_thread=True)
    await h.post(model_free(), "stuck1")
    await receiver.wait_for(1)
    await h.settle()
    assert len(finish.calls) == 7  # 3 quick tries, then the background ones until it took
    assert (await h.status("stuck1"))["state"] == "success"
    assert len(h.courier.runs) == 0  # its place under COURIER_MAX_QUEUE is free
    assert_one_event_each(receiver, [("stuck1", 1)])


def recording_states(monkeypatch, fail_uploading: bool = False) -> list[str]:
    """Journal.set_state, recording each state asked for (failing "uploading" if told)."""
    real = Journal.set_state
    states: list[str] = []

    def set_state(self, prompt_id, state, **fields):
        states.append(state.value)
        if fail_uploading and state.value == "uploading":
            raise sqlite3.OperationalError("database is locked")
        return real(self, prompt_id, state, **fields)

    monkeypatch.setattr(Journal, "set_state", set_state)
    return states


async def test_an_uploading_mark_that_cannot_be_written_does_not_strand_the_job(
        make_harness, receiver, monkeypatch, storage_server):
    states = recording_states(monkeypatch, fail_uploading=True)
    storage_server.state.delay_uploads = 0.2  # still uploading when ComfyUI reports the end
    h = await make_harness(journal_thread=True, env={
        "SUPABASE_URL": storage_server.url, "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    await h.post(model_free(), "up1")
    await receiver.wait_for(1)
    await h.settle()
    assert "uploading" in states  # it was tried, and failed
    assert receiver.bodies("up1")[0]["status"] == "success"
    assert len(h.courier.runs) == 0


async def test_a_job_with_nothing_left_to_upload_ends_without_an_uploading_mark(
        make_harness, receiver, monkeypatch):
    """Local storage serves the node's own file: the upload is done when ComfyUI reports
    the end, so the end is written at once, after the image's row (queued first)."""
    states = recording_states(monkeypatch)
    h = await make_harness(journal_thread=True)
    await h.post(model_free(), "served1")
    [callback] = await receiver.wait_for(1)
    await h.settle()
    assert callback.json["status"] == "success"
    assert "uploading" not in states
    job = await h.courier.store.latest("served1")
    [(_, row)] = await h.courier.store.images("served1", job.attempt)
    # committed before the end: a row written after it would have been refused
    assert row.url == callback.json["image_url"]


async def test_an_image_row_failing_once_is_retried_not_an_upload_error(
        make_harness, receiver, monkeypatch, storage_server):
    monkeypatch.setattr(uploads, "RECORD_RETRY", (0.01, 0.01))
    record = failing(Journal.record_image, 1)
    monkeypatch.setattr(Journal, "record_image", record)
    h = await make_harness(journal_thread=True, env={
        "SUPABASE_URL": storage_server.url, "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    await h.post(model_free(), "img1")
    await receiver.wait_for(1)
    await h.settle()
    [body] = receiver.bodies("img1")
    assert body["status"] == "success" and body["image_url"]
    assert len(record.calls) == 3  # the failed row, its retry, and the row with the URL


async def finish_with_the_journal_process_stopped(h, cid: str) -> JournalProcess:
    """Queue a job, SIGSTOP the journal process, let ComfyUI run the job to its end."""
    await h.post(model_free(), cid)
    runner = h.courier.store.runner
    assert isinstance(runner, JournalProcess) and runner.pid is not None
    os.kill(runner.pid, signal.SIGSTOP)
    h.comfy.start(asyncio.get_running_loop())
    # ComfyUI finished the prompt; its end waits on the stopped journal
    await wait_until(lambda: all(run.completed for run in h.courier.runs.by_prompt.values()))
    await wait_until(lambda: bool(runner._inflight))
    return runner


async def test_journal_process_stopped_then_killed_while_a_job_ends(make_harness, receiver):
    h = await make_harness(start_worker=False)
    runner = await finish_with_the_journal_process_stopped(h, "kill1")
    stopped = runner.pid
    assert stopped is not None
    os.kill(stopped, signal.SIGKILL)  # calls in flight fail: a status read now gets a 503
    await receiver.wait_for(1)
    await h.settle()
    assert (await h.status("kill1"))["state"] == "success"
    assert runner.pid != stopped  # a new journal process took over
    assert_one_event_each(receiver, [("kill1", 1)])
    assert len(h.courier.runs) == 0


async def test_journal_process_stopped_then_continued_while_a_job_ends(make_harness, receiver):
    h = await make_harness(start_worker=False)
    runner = await finish_with_the_journal_process_stopped(h, "cont1")
    await asyncio.sleep(0.3)
    assert receiver.requests == []  # nothing is told before the end is written
    assert runner.pid is not None
    os.kill(runner.pid, signal.SIGCONT)
    final = await h.wait_final("cont1")
    assert final["state"] == "success"
    await receiver.wait_for(1)
    await h.settle()
    assert_one_event_each(receiver, [("cont1", 1)])
