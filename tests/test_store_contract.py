"""The `Store` protocol's async methods, each run against both backends: the SQLite
journal (on its thread) and PostgreSQL (a throwaway server; see conftest.postgres_url).

What every backend must do is tested here once; what only one does (SQLite's WAL and
indexes, Postgres's schema, leases and migrations) has tests of its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from comfy_courier.executor.jobs import ErrorType, Job, JobState, Output
from comfy_courier.executor.store import OutboxEvent, Store


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request, tmp_path) -> Any:
    if request.param == "sqlite":
        from comfy_courier.executor.store.sqlite import open_sqlite

        made: Store = open_sqlite(tmp_path / "contract.sqlite3", on_thread=True)
    else:
        from comfy_courier.executor.store.postgres import open_postgres

        url = request.getfixturevalue("postgres_url")
        made = open_postgres(url, request.getfixturevalue("pg_schema"))
    yield made
    await made.aclose()


def job(cid="j1", prompt_id="p1", instance="host:8188", fingerprint="f", at=1.0) -> Job:
    return Job(content_request_id=cid, attempt=0, prompt_id=prompt_id, instance=instance,
               workflow='{"1": {}}', fingerprint=fingerprint, created_at=at)


def event(cid="j1", attempt=1, event_id="msg_1", at=2.0) -> OutboxEvent:
    return OutboxEvent(event_id, cid, attempt, b'{"x":1}', 0, at)


async def admit(store, new: Job) -> Job | int:
    """Admit `new`; on acceptance it gets its attempt number (as Admission does)."""
    result = await store.admit(new, lambda r: r, lambda _: None)
    if isinstance(result, int):
        new.attempt = result
    return result


async def finished(store, done: Job, state=JobState.SUCCESS, with_event=True,
                   event_id=None, at=3.0) -> bool:
    done.state, done.finished_at = state, at
    done.error_type = ErrorType.EXECUTION if state is JobState.ERROR else None
    callback = None
    if with_event:
        callback = event(done.content_request_id, done.attempt,
                         event_id or f"msg_{done.content_request_id}_{done.attempt}", at)
    return await store.finish(done, callback)


def image(key="j1/1-1.jpg", url=None) -> Output:
    return Output("9", 0, key, "image/jpeg", 10, 8, 8, url=url, path="/out/x.jpg")


async def test_admit_applies_the_duplicate_rule(store):
    first = job()
    assert await admit(store, first) == 1
    # while it runs, the same request and another workflow are answered with it
    assert (await admit(store, job(prompt_id="p2"))).prompt_id == "p1"
    assert (await admit(store, job(prompt_id="p3", fingerprint="g"))).prompt_id == "p1"
    # a final error lets the same request start attempt 2, and drops the old event
    assert await finished(store, first, JobState.ERROR)
    second = job(prompt_id="p4")
    assert await admit(store, second) == 2
    assert await store.callback_summary("j1", 1) == await store.callback_summary("j1", 1)
    assert (await store.callback_summary("j1", 1)).state == "dropped"
    assert await store.outbox_backlog() == (0, 0)
    # a success blocks for good
    assert await finished(store, second)
    blocking = await admit(store, job(prompt_id="p5"))
    assert isinstance(blocking, Job) and blocking.attempt == 2
    assert blocking.state is JobState.SUCCESS
    assert (await store.latest("j1")).prompt_id == "p4"


async def test_a_burst_of_admissions_all_commit(store):
    jobs = [job(f"b{i}", f"pb{i}") for i in range(60)]
    results = await asyncio.gather(*(admit(store, j) for j in jobs))
    assert results == [1] * 60
    assert await store.count_unfinished() == 60
    assert len(await store.unfinished("host:8188")) == 60


async def test_concurrent_requests_for_one_id_accept_one_attempt(store):
    results = await asyncio.gather(*(admit(store, job("same", f"ps{i}")) for i in range(8)))
    accepted = [r for r in results if r == 1]
    replays = [r for r in results if isinstance(r, Job)]
    assert len(accepted) == 1 and len(replays) == 7
    assert len({r.prompt_id for r in replays}) == 1
    assert await store.count_unfinished() == 1


async def test_finish_writes_the_final_state_and_its_event_once(store):
    done = job()
    await admit(store, done)
    assert await finished(store, done, event_id="msg_a") is True
    again = job()
    again.attempt = 1
    assert await finished(store, again, JobState.ERROR, event_id="msg_b") is False
    latest = await store.latest("j1")
    assert latest.state is JobState.SUCCESS and latest.finished_at == 3.0
    assert await store.outbox_backlog() == (1, 0)
    assert (await store.callback_summary("j1", 1)).state == "pending"
    assert await store.count_unfinished() == 0


async def test_finish_without_a_callback_url_writes_no_event(store):
    done = job()
    await admit(store, done)
    assert await finished(store, done, with_event=False)
    assert await store.callback_summary("j1", 1) is None
    assert (await store.latest("j1")).state is JobState.SUCCESS


async def test_set_state_moves_unfinished_jobs_only(store):
    run = job()
    await admit(store, run)
    assert await store.set_state("p1", JobState.RUNNING, epoch=1, started_at=5.0)
    latest = await store.latest("j1")
    assert latest.state is JobState.RUNNING and latest.started_at == 5.0
    assert await store.set_state("p1", JobState.UPLOADING, executed_at=6.0, expected_images=2)
    assert (await store.latest("j1")).expected_images == 2
    assert await finished(store, run)
    assert await store.set_state("p1", JobState.RUNNING) is False
    assert await store.set_state("nope", JobState.RUNNING) is False


async def test_a_run_taken_over_can_write_nothing(store):
    run = job()
    await admit(store, run)
    assert await store.reclaim("p1", 1) == 2
    assert await store.reclaim("p1", 1) is None  # someone else's claim moved on
    stale = job()
    stale.attempt, stale.epoch = 1, 1
    assert await store.set_state("p1", JobState.RUNNING, epoch=1) is False
    assert await store.record_image(stale, 1, image()) is False
    assert await finished(store, stale) is False
    assert await store.fenced("host:8188", [("p1", 1), ("p1", 2)]) == ["p1"]
    current = job()
    current.attempt, current.epoch = 1, 2
    assert await store.record_image(current, 1, image())
    assert await finished(store, current)
    assert await store.fenced("host:8188", [("p1", 2)]) == ["p1"]  # ended: not writable


async def test_writes_apply_in_call_order(store):
    run = job()
    await admit(store, run)
    recorded = [store.record_image(run, n, image(f"j1/1-{n}.jpg")) for n in (1, 2, 3)]
    # not awaited yet: the final write still commits after them
    assert await finished(store, run)
    assert await asyncio.gather(*recorded) == [True, True, True]
    assert [seq for seq, _ in await store.images("j1", 1)] == [1, 2, 3]
    # a row written again (its URL once uploaded) replaces the first
    late = job(cid="j2", prompt_id="p2")
    await admit(store, late)
    assert await store.record_image(late, 1, image("j2/1-1.jpg"))
    assert await store.record_image(late, 1, image("j2/1-1.jpg", url="https://x/1"))
    [(seq, stored)] = await store.images("j2", 1)
    assert seq == 1 and stored.url == "https://x/1" and stored.path == "/out/x.jpg"


async def test_resubmission_gives_a_new_prompt_and_epoch_unless_it_ended(store):
    run = job()
    await admit(store, run)
    assert await store.record_image(run, 1, image())
    assert await store.resubmitted("p1", "p1-again", 4.0, count_run=True) == 2
    latest = await store.latest("j1")
    assert (latest.prompt_id, latest.runs, latest.epoch) == ("p1-again", 2, 2)
    assert latest.state is JobState.QUEUED and await store.images("j1", 1) == []
    ended = job("j2", "p2")
    await admit(store, ended)
    assert await finished(store, ended)
    assert await store.resubmitted("p2", "p2-again", 4.0, count_run=True) is None
    assert (await store.latest("j2")).prompt_id == "p2"
    # a job that only waited in the queue keeps its run count; its epoch still goes up
    assert await store.resubmitted("p1-again", "p1-b", 5.0, count_run=False) == 3
    latest = await store.latest("j1")
    assert (latest.prompt_id, latest.runs, latest.epoch) == ("p1-b", 2, 3)


async def test_cancel_requests_reach_the_owning_instance_while_it_can_act(store):
    await admit(store, job("c1", "p1", instance="a:1"))
    await admit(store, job("c2", "p2", instance="b:2"))
    assert await store.request_cancel("c1", 1) and await store.request_cancel("c2", 1)
    assert await store.cancel_requests("a:1") == ["p1"]
    assert (await store.latest("c1")).cancel_requested
    await store.set_state("p1", JobState.UPLOADING)
    assert await store.request_cancel("c1", 1) is False  # its images are being stored
    assert await store.request_cancel("c1", 2) is False  # no such attempt


async def test_adopting_a_silent_instance_moves_its_jobs_and_callbacks(store):
    await store.heartbeat("old:1", 0.0)
    await store.heartbeat("live:1", 100.0)
    await admit(store, job("a", "pa", instance="old:1"))
    gone = job("b", "pb", instance="old:1")
    await admit(store, gone)
    await finished(store, gone)
    assert await store.adopt_stale("live:1", 100.0, 60.0) == ["old:1"]
    assert [j.content_request_id for j in await store.unfinished("live:1")] == ["a"]
    assert await store.unfinished("old:1") == []
    assert [e.event_id for e in await store.due_events("live:1", 100.0, 10)] == ["msg_b_1"]
    assert await store.adopt_stale("other:1", 100.0, 60.0) == []  # taken once
    await store.heartbeat("live:1", 200.0)
    assert await store.adopt_stale("other:1", 200.0, 60.0) == []  # live


async def test_due_events_delivery_records_and_the_next_due_time(store):
    done = job()
    await admit(store, done)
    await finished(store, done, event_id="msg_1")
    assert [e.event_id for e in await store.due_events("host:8188", 5.0, 10)] == ["msg_1"]
    await store.record_delivery("msg_1", "pending", 1, 5.0, 100.0, "HTTP 503")
    assert await store.due_events("host:8188", 5.0, 10) == []
    assert await store.next_due_at("host:8188") == 100.0
    assert await store.next_due_at("host:8188", ("msg_1",)) is None  # in flight
    summary = await store.callback_summary("j1", 1)
    assert (summary.state, summary.attempts, summary.last_error) == ("pending", 1, "HTTP 503")
    [due] = await store.due_events("host:8188", 100.0, 10)
    assert due.attempts == 1 and due.body == b'{"x":1}'
    await store.record_delivery("msg_1", "delivered", 2, 101.0)
    assert (await store.callback_summary("j1", 1)).state == "delivered"
    assert await store.outbox_backlog() == (0, 0)
    assert await store.next_due_at("host:8188") is None


async def test_a_dropped_event_stays_dropped_and_older_attempts_are_not_current(store):
    first = job()
    await admit(store, first)
    await finished(store, first, JobState.ERROR, event_id="msg_1")
    assert await store.event_still_current("msg_1")
    await admit(store, job(prompt_id="p2"))  # attempt 2 drops attempt 1's event
    assert not await store.event_still_current("msg_1")
    await store.record_delivery("msg_1", "pending", 1, 4.0, 10.0, "HTTP 503")  # a late record
    assert (await store.callback_summary("j1", 1)).state == "dropped"
    assert await store.due_events("host:8188", 100.0, 10) == []
    second = job(prompt_id="p3")
    second.attempt = 1
    await store.drop_event("msg_1", 5.0)
    assert (await store.callback_summary("j1", 1)).state == "dropped"


async def test_dead_letters_are_redelivered_under_the_same_event_id(store):
    for cid, at in (("d1", 10.0), ("d2", 20.0)):
        done = job(cid, f"p{cid}")
        await admit(store, done)
        await finished(store, done, JobState.ERROR, event_id=f"msg_{cid}")
        await store.record_delivery(f"msg_{cid}", "dead", 3, at, None, "HTTP 410")
    assert await store.outbox_backlog() == (0, 2)
    [one] = await store.redeliver_dead("ops:1", 50.0, "d1")
    assert (one.event_id, one.attempts, one.created_at) == ("msg_d1", 0, 50.0)
    summary = await store.callback_summary("d1", 1)
    assert (summary.state, summary.attempts, summary.last_error) == ("pending", 0, None)
    assert await store.redeliver_dead("ops:1", 60.0, "d1") == []  # not dead any more
    assert [e.event_id for e in await store.redeliver_dead("ops:1", 60.0, None, 15.0)] == [
        "msg_d2"]
    assert sorted(e.event_id for e in await store.due_events("ops:1", 60.0, 10)) == [
        "msg_d1", "msg_d2"]


async def test_prune_slims_old_final_attempts_to_their_outcome(store):
    for cid, at, outbox in (("old", 100.0, "delivered"), ("pending", 110.0, "pending"),
                            ("recent", 900.0, "delivered")):
        done = job(cid, f"p-{cid}")
        await admit(store, done)
        await store.record_image(done, 1, image(f"{cid}/1-1.jpg"))
        await finished(store, done, event_id=f"msg_{cid}", at=at)
        if outbox != "pending":
            await store.record_delivery(f"msg_{cid}", outbox, 1, at + 1)
    retried = job("twice", "p-t1")
    await admit(store, retried)
    await finished(store, retried, JobState.ERROR, event_id="msg_t1", at=120.0)
    await store.record_delivery("msg_t1", "delivered", 1, 121.0)
    again = job("twice", "p-t2")
    await admit(store, again)
    await finished(store, again, event_id="msg_t2", at=130.0)
    await store.record_delivery("msg_t2", "delivered", 1, 131.0)
    await admit(store, job("queued", "p-q"))  # never finished: never pruned
    assert await store.prune(500.0, 100) == 3  # old, twice/1, twice/2
    kept = await store.latest("old")
    assert kept.state is JobState.SUCCESS and kept.fingerprint == "f"
    assert kept.workflow == "" and await store.images("old", 1) == []
    assert await store.callback_summary("old", 1) is None
    assert (await store.latest("twice")).attempt == 2
    assert await store.images("pending", 1) != []  # its callback is still being tried
    assert await store.images("recent", 1) != []
    blocking = await admit(store, job("old", "p-old-2"))
    assert isinstance(blocking, Job) and blocking.attempt == 1  # still replays
    assert await store.prune(500.0, 100) == 0


async def test_unfinished_is_per_instance_and_oldest_first(store):
    await admit(store, job("late", "p2", instance="a:1", at=5.0))
    await admit(store, job("early", "p1", instance="a:1", at=2.0))
    await admit(store, job("other", "p3", instance="b:1"))
    assert [j.content_request_id for j in await store.unfinished("a:1")] == ["late", "early"][::-1]
    assert await store.count_unfinished() == 3
