"""The Postgres store's writer (store/postgres/writer.py): the statements queued while the
writer is busy go out together in one round trip, each in its own transaction, and every
guarantee of a one-by-one writer holds: call order, commit before the answer, fencing,
one final event per attempt, a failure that touches only its own call, a broken
connection that fails each unconfirmed call with StoreError and asks for a rescan."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from comfy_courier.executor.errors import StoreError
from comfy_courier.executor.jobs import Job, JobState, Output
from comfy_courier.executor.store import OutboxEvent

psycopg = pytest.importorskip("psycopg", reason="pip install -e '.[test,postgres]'")

from comfy_courier.executor.store.postgres import writer  # noqa: E402
from comfy_courier.executor.store.postgres.store import PostgresStore  # noqa: E402


def sql(url, statement, *params):
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else None


@pytest.fixture
async def store(postgres_url, pg_schema):
    made = PostgresStore(postgres_url, pg_schema)
    yield made
    await made.aclose()


async def running_job(store, cid="j1", prompt_id="p1") -> Job:
    job = Job(content_request_id=cid, attempt=0, prompt_id=prompt_id, instance="a:1",
              workflow="{}", fingerprint="f", created_at=1.0)
    job.attempt = await store.admit(job, lambda r: r, lambda _: None)
    assert await store.set_state(prompt_id, JobState.RUNNING, epoch=job.epoch, started_at=2.0)
    return job


def image(cid="j1", url="https://x/j1-1.png") -> Output:
    return Output("9", 0, f"{cid}/1-1.png", "image/png", 10, 8, 8, url=url, path="/out/1.png")


def ended(job: Job) -> tuple[Job, OutboxEvent]:
    done = replace(job, state=JobState.SUCCESS, finished_at=5.0,
                   image_urls=("https://x/j1-1.png",))
    return done, OutboxEvent(f"msg_{job.content_request_id}", job.content_request_id,
                             job.attempt, b'{"status":"success"}', 0, 5.0)


class Gate:
    """Holds the writer on a call of its own while the test queues writes behind it, so
    that they go out as one burst when it opens."""

    def __init__(self, store) -> None:
        self.store = store
        self.opened = asyncio.Event()
        self.held = store.db.submit(self._hold)

    async def _hold(self, conn) -> None:
        await self.opened.wait()

    async def queued(self, n: int) -> None:
        """Wait until `n` writes wait behind the gate (coroutines queue on their first step)."""
        while len(self.store.db.writer._queue) < n:
            await asyncio.sleep(0)

    async def open(self) -> None:
        self.opened.set()
        await self.held


def statement(store, text: str, *params):
    return store.db.statement(text, params, writer.rowcount)


async def test_writes_queued_together_share_one_round_trip_in_call_order(store, postgres_url,
                                                                         pg_schema):
    job = await running_job(store)
    done, event = ended(job)
    gate = Gate(store)
    row = store.record_image(job, 1, image())
    mark = asyncio.ensure_future(store.set_state("p1", JobState.UPLOADING, epoch=job.epoch,
                                                 expected_images=1))
    end = asyncio.ensure_future(store.finish(done, event))
    await gate.queued(3)
    bursts = store.db.writer.bursts
    await gate.open()
    assert await asyncio.gather(row, mark, end) == [True, True, True]
    assert store.db.writer.bursts == bursts + 1  # one round trip for the three
    # each committed in call order: the row and the mark before the end that refuses
    # any write after it
    assert [o.url for _, o in await store.images("j1", 1)] == ["https://x/j1-1.png"]
    latest = await store.latest("j1")
    assert latest.state is JobState.SUCCESS and latest.expected_images == 1
    assert sql(postgres_url, f'SELECT event_id FROM "{pg_schema}".outbox') == [("msg_j1",)]


async def test_in_one_burst_a_fenced_run_is_refused_and_an_attempt_ends_once(store,
                                                                             postgres_url,
                                                                             pg_schema):
    job = await running_job(store)
    stale = replace(job, epoch=job.epoch - 1)  # a run another host has since taken over
    done, event = ended(job)
    late, late_event = ended(stale)
    again, again_event = ended(job)
    again_event = replace(again_event, event_id="msg_second")
    gate = Gate(store)
    fenced_row = store.record_image(stale, 1, image())
    fenced_end = asyncio.ensure_future(store.finish(late, late_event))
    end = asyncio.ensure_future(store.finish(done, event))
    second_end = asyncio.ensure_future(store.finish(again, again_event))
    await gate.queued(4)
    await gate.open()
    assert await asyncio.gather(fenced_row, fenced_end, end, second_end) == [
        False, False, True, False]
    assert await store.images("j1", 1) == []
    assert sql(postgres_url, f'SELECT event_id FROM "{pg_schema}".outbox') == [("msg_j1",)]


async def test_a_refused_statement_fails_alone_and_is_never_half_applied(store, postgres_url,
                                                                         pg_schema):
    failures: list[str] = []
    store.on_failure = lambda: failures.append("look again")
    job = await running_job(store)
    done, event = ended(job)
    s = f'"{pg_schema}"'
    gate = Gate(store)
    before = statement(store, f"UPDATE {s}.jobs SET expected_images = 7 WHERE prompt_id = 'p1'")
    # writes a row, then fails: its own transaction, so the write is rolled back
    broken = statement(store, f"WITH w AS (UPDATE {s}.jobs SET error_message = 'half'"
                       " WHERE prompt_id = 'p1' RETURNING 1) SELECT 1 / 0 FROM w")
    row = store.record_image(job, 1, image())
    end = asyncio.ensure_future(store.finish(done, event))
    await gate.queued(4)
    bursts = store.db.writer.bursts
    await gate.open()
    outcomes = await asyncio.gather(before, broken, row, end, return_exceptions=True)
    assert outcomes[0] == 1
    assert isinstance(outcomes[1], StoreError) and "division by zero" in str(outcomes[1])
    assert outcomes[2:] == [True, True]  # skipped by the server after the failure, sent again
    assert store.db.writer.bursts == bursts + 2
    await asyncio.sleep(0)
    assert failures == ["look again"]
    assert sql(postgres_url, f"SELECT expected_images, error_message, state FROM {s}.jobs") == [
        (7, None, "success")]
    assert len(await store.images("j1", 1)) == 1


async def test_a_connection_broken_in_a_burst_fails_each_unconfirmed_call_then_rescans(
        store, postgres_url, pg_schema):
    lost: list[str] = []
    store.on_lost = lambda: lost.append("rescan")
    job = await running_job(store)
    done, event = ended(job)
    s = f'"{pg_schema}"'
    gate = Gate(store)
    before = statement(store, f"UPDATE {s}.jobs SET expected_images = 7 WHERE prompt_id = 'p1'")
    cut = statement(store, "SELECT pg_terminate_backend(pg_backend_pid())")
    row = store.record_image(job, 1, image())
    end = asyncio.ensure_future(store.finish(done, event))
    await gate.queued(4)
    await gate.open()
    outcomes = await asyncio.gather(before, cut, row, end, return_exceptions=True)
    # every caller has its answer or StoreError (it may or may not have been written)
    assert outcomes[0] == 1 or isinstance(outcomes[0], StoreError)
    assert isinstance(outcomes[1], StoreError)
    # what the server ran before the cut stands, and nothing after it: a write after the
    # cut is in the database only if it was never sent and went out again on a new
    # connection (then its caller has its answer)
    assert sql(postgres_url, f"SELECT expected_images FROM {s}.jobs") == [(7,)]
    images = await store.images("j1", 1)
    assert (outcomes[2] is True and len(images) == 1) or (
        isinstance(outcomes[2], StoreError) and images == [])
    events = sql(postgres_url, f"SELECT event_id FROM {s}.outbox")
    assert (outcomes[3] is True and events == [("msg_j1",)]) or (
        isinstance(outcomes[3], StoreError) and events == [])
    if isinstance(outcomes[3], StoreError):
        assert await store.finish(done, event)  # the caller's retry
    await store.heartbeat("a:1", 9.0)  # the writer is connected again by now
    await asyncio.sleep(0)
    assert lost == ["rescan"]  # told once, after the reconnection
    assert (await store.latest("j1")).state is JobState.SUCCESS


async def test_writes_queued_behind_a_broken_burst_go_out_on_the_new_connection(
        store, postgres_url, pg_schema):
    job = await running_job(store)
    gate = Gate(store)
    cut = statement(store, "SELECT pg_terminate_backend(pg_backend_pid())")
    other = statement(store, "SELECT 1")
    await gate.queued(2)
    await gate.open()
    await asyncio.sleep(0)
    after = store.record_image(job, 1, image())  # queued while the burst is answered
    outcomes = await asyncio.gather(cut, other, after, return_exceptions=True)
    assert isinstance(outcomes[0], StoreError) and isinstance(outcomes[1], StoreError)
    assert outcomes[2] is True
    assert len(await store.images("j1", 1)) == 1


async def test_a_lone_statement_waits_a_sliver_of_a_round_trip_for_the_next(store,
                                                                            monkeypatch):
    job = await running_job(store)
    monkeypatch.setattr(writer, "LINGER_MAX", 0.05)
    store.db.writer.round_trip = 1.0  # a database far away: the wait is LINGER_MAX
    bursts = store.db.writer.bursts
    row = store.record_image(job, 1, image())
    await asyncio.sleep(0)  # the writer woke up for the row alone
    mark = asyncio.ensure_future(store.set_state("p1", JobState.UPLOADING, epoch=job.epoch))
    assert await asyncio.gather(row, mark) == [True, True]
    assert store.db.writer.bursts == bursts + 1  # the mark caught up with the row


async def test_writes_of_several_statements_run_alone_between_bursts(store, postgres_url,
                                                                     pg_schema):
    job = await running_job(store)
    gate = Gate(store)
    row = store.record_image(job, 1, image())
    resubmitted = asyncio.ensure_future(store.resubmitted("p1", "p1-b", 3.0, count_run=True))
    mark = asyncio.ensure_future(store.set_state("p1-b", JobState.RUNNING, epoch=job.epoch + 1))
    await gate.queued(3)
    await gate.open()
    assert await asyncio.gather(row, resubmitted, mark) == [True, job.epoch + 1, True]
    # the resubmission (a transaction of its own) ran after the row and dropped it
    assert await store.images("j1", 1) == []
    latest = await store.latest("j1")
    assert (latest.prompt_id, latest.state, latest.runs) == ("p1-b", JobState.RUNNING, 2)


async def test_a_statement_that_cannot_be_sent_fails_alone(store, pg_schema):
    job = await running_job(store)
    gate = Gate(store)
    row = store.record_image(job, 1, image())
    unsendable = statement(store, "SELECT %s, %s", 1)  # one parameter short: never sent
    mark = asyncio.ensure_future(store.set_state("p1", JobState.UPLOADING, epoch=job.epoch))
    await gate.queued(3)
    await gate.open()
    outcomes = await asyncio.gather(row, unsendable, mark, return_exceptions=True)
    assert outcomes[0] is True and outcomes[2] is True
    assert isinstance(outcomes[1], StoreError)
    assert (await store.latest("j1")).state is JobState.UPLOADING
