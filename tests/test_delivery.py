"""The deliverer against a real loopback receiver: outcomes, schedule, headers."""

import asyncio
import logging
import sqlite3

import pytest

from comfy_courier.executor import delivery
from comfy_courier.executor.delivery import (
    Delivered,
    Deliverer,
    Permanent,
    Retry,
    classify,
    parse_retry_after,
)
from comfy_courier.executor.jobs import Job
from comfy_courier.executor.store import OutboxEvent
from comfy_courier.executor.store.sqlite.journal import Journal

from conftest import BODY, model_free


@pytest.mark.parametrize("status, kind", [(200, Delivered), (204, Delivered), (301, Retry),
                                          (400, Retry), (401, Retry), (403, Retry), (404, Retry),
                                          (410, Permanent), (408, Retry), (422, Retry),
                                          (425, Retry), (429, Retry), (500, Retry), (503, Retry)])
def test_classify(status, kind):
    """Every non-2xx is retried (a wrong key at the receiver is fixable); 410 Gone stops."""
    assert isinstance(classify(status, None, 0.0), kind)


def test_retry_after_seconds_and_dates():
    assert parse_retry_after("120", 0) == 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10
    assert parse_retry_after("soon", 0) is None


@pytest.fixture
async def deliverers():
    """Builds Deliverers and closes their HTTP sessions after the test."""
    made = []

    def make(*args, **kwargs):
        made.append(Deliverer(*args, **kwargs))
        return made[-1]

    yield make
    for deliverer in made:
        await deliverer.close()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


async def test_retry_after_is_honoured_and_horizon_dead_letters(outbox, receiver, deliverers):
    clock = Clock()
    receiver.script = [(503, {"Retry-After": "40"}, 0.0), (503, {}, 0.0)]
    d = deliverers(outbox, "i", receiver.url, "k", (), schedule=(0, 5, 30), horizon=60,
                  jitter=0.0, clock=clock, monotonic=clock)
    assert await d.dispatch_due() == 1
    await d.drain()
    assert await outbox.next_due_at("i") == 40.0  # max(5, Retry-After 40)
    clock.now = 40.0
    await d.dispatch_due()
    await d.drain()
    summary = await outbox.callback_summary("d1", 1)
    assert summary.state == "dead" and summary.attempts == 2  # 40 + 30 > 60 s horizon
    assert len(receiver.requests) == 2


async def test_slow_receiver_times_out_and_is_retried(outbox, receiver, deliverers):
    receiver.script = [(200, {}, 1.0)]
    d = deliverers(outbox, "i", receiver.url, None, (), schedule=(0, 0), timeout=0.2,
                  jitter=0.0, clock=Clock())
    await d.dispatch_due()
    await d.drain()
    summary = await outbox.callback_summary("d1", 1)
    assert summary.state == "pending" and "no answer" in summary.last_error
    await d.dispatch_due()
    await d.drain()
    assert (await outbox.callback_summary("d1", 1)).state == "delivered"


async def test_unreachable_receiver_is_retried(outbox, deliverers):
    d = deliverers(outbox, "i", "http://127.0.0.1:9/callback", None, (), schedule=(0, 5),
                  clock=Clock())
    await d.dispatch_due()
    await d.drain()
    summary = await outbox.callback_summary("d1", 1)
    assert summary.state == "pending" and summary.attempts == 1


async def test_a_fresh_event_is_sent_at_once_and_only_once(outbox, receiver, deliverers):
    d = deliverers(outbox, "i", receiver.url, None, (), jitter=0.0, clock=Clock())
    event = OutboxEvent("msg_d1", "d1", 1, BODY, 0, 0.0)
    assert d.deliver_now(event) is True
    assert d.deliver_now(event) is False  # already in flight
    assert await d.dispatch_due() == 0  # the outbox pass skips it too
    await d.drain()
    assert len(receiver.requests) == 1
    assert (await outbox.callback_summary("d1", 1)).state == "delivered"


async def test_a_redirect_is_not_followed_but_retried_with_its_target(outbox, receiver, deliverers):
    # e.g. Vercel sending http:// to https:// with a 308: the fix is the URL, and the kept
    # event arrives once it is fixed
    receiver.script = [(308, {"Location": "https://app.example/api/comfy-callback"}, 0.0)]
    d = deliverers(outbox, "i", receiver.url, "k", (), schedule=(0, 5), jitter=0.0,
                  clock=Clock())
    await d.dispatch_due()
    await d.drain()
    summary = await outbox.callback_summary("d1", 1)
    assert summary.state == "pending" and len(receiver.requests) == 1
    assert "HTTP 308 redirect to https://app.example/api/comfy-callback" in summary.last_error
    assert "COURIER_CALLBACK_URL" in summary.last_error


# -- issue 15 (4): every path through a delivery advances its schedule ---------------------


@pytest.mark.parametrize("value", [
    "²", "٣", "1²", "1.5", "-1", "+5", "1e3", "0x10", "", " ", "soon",
    "wed, 21 Oct 2015 07:28:00 GMT",  # HTTP-date is case-sensitive
    "Wed, 21 Oct 2015 07:28:00 +0000",  # only GMT
    "Wed, 31 Feb 2015 07:28:00 GMT",  # no such day
    "Wed, 21 Oct 2015 07:28:00 GMT junk",
])
def test_retry_after_that_is_neither_delay_seconds_nor_an_http_date_is_ignored(value):
    # "²".isdigit() is True but float("²") raises: the old parser sent again at once
    assert parse_retry_after(value, 0.0) is None


def test_retry_after_takes_ascii_delay_seconds_and_every_http_date_form():
    assert parse_retry_after(" 120\t", 0) == 120
    assert parse_retry_after("0", 0) == 0
    assert parse_retry_after("9" * 40, 0) == 2**31  # too large to represent: 2^31 (RFC 9111)
    now = 1445412470.0  # 10 s before Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 10  # IMF-fixdate
    assert parse_retry_after("Wednesday, 21-Oct-15 07:28:00 GMT", now) == 10  # RFC 850
    assert parse_retry_after("Wed Oct 21 07:28:00 2015", now) == 10  # asctime
    assert parse_retry_after("Sun Nov  6 08:49:37 1994", now) == 0  # in the past: now


async def test_an_unusable_retry_after_is_a_counted_retry_not_an_immediate_resend(
        outbox, receiver, deliverers):
    clock = Clock()
    receiver.script = [(503, {"Retry-After": "²"}, 0.0)]
    d = deliverers(outbox, "i", receiver.url, None, (), schedule=(0, 5), jitter=0.0,
                   clock=clock, monotonic=clock)
    await d.dispatch_due()
    await d.drain()
    summary = await outbox.callback_summary("d1", 1)
    assert summary.state == "pending" and summary.attempts == 1
    assert await outbox.next_due_at("i") == 5.0  # the schedule, the header ignored
    assert await d.dispatch_due() == 0  # not due again before then
    assert len(receiver.requests) == 1


def refuse_writes(monkeypatch, states=("pending", "delivered", "dead")):
    """Journal.record_delivery fails, as on a full disk, for outcomes in `states`."""
    real = Journal.record_delivery

    def record_delivery(self, event_id, state, *args):
        if state in states:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, event_id, state, *args)

    monkeypatch.setattr(Journal, "record_delivery", record_delivery)
    return lambda: monkeypatch.setattr(Journal, "record_delivery", real)


async def test_a_try_the_store_cannot_record_is_held_counted_and_dead_lettered(
        outbox, receiver, deliverers, monkeypatch):
    clock = Clock()
    receiver.script = [(503, {}, 0.0)] * 3
    restore = refuse_writes(monkeypatch)
    d = deliverers(outbox, "i", receiver.url, None, (), schedule=(0, 5, 30), horizon=60,
                   jitter=0.0, clock=clock, monotonic=clock)
    assert await d.dispatch_due() == 1
    await d.drain()
    for _ in range(5):  # the row still says "due now": the old deliverer re-sent each time
        assert await d.dispatch_due() == 0
        await d.drain()
    assert len(receiver.requests) == 1
    assert 4.9 < await d._pass() <= 5.0  # the loop sleeps until then, no tight loop

    clock.now = 5.0  # the held schedule's next try
    assert await d.dispatch_due() == 1
    await d.drain()
    assert len(receiver.requests) == 2
    restore()
    clock.now = 35.0
    await d.dispatch_due()
    await d.drain()
    summary = await outbox.callback_summary("d1", 1)
    # tries 1 and 2 were counted in memory; 35 s old + 30 s to the next > the 60 s horizon
    assert (summary.state, summary.attempts) == ("dead", 3)
    assert "gave up after 3 tries" in summary.last_error
    assert len(receiver.requests) == 3


async def test_a_delivered_try_the_store_cannot_record_is_not_sent_again_and_recorded_later(
        outbox, receiver, deliverers, monkeypatch):
    clock = Clock()
    restore = refuse_writes(monkeypatch, states=("delivered",))
    d = deliverers(outbox, "i", receiver.url, None, (), jitter=0.0, clock=clock,
                   monotonic=clock)
    await d.dispatch_due()
    await d.drain()
    for step in (0.0, 0.5, 1.0, 2.0):  # refused again at 1 s; next write at 3 s
        clock.now = step
        assert await d.dispatch_due() == 0
        await d.drain()
    assert (await outbox.callback_summary("d1", 1)).state == "pending"
    restore()
    clock.now = 3.0
    await d.dispatch_due()
    await d.drain()
    summary = await outbox.callback_summary("d1", 1)
    assert (summary.state, summary.attempts) == ("delivered", 1)
    assert len(receiver.requests) == 1


# -- issue 15 (7): the schedule and horizon are durations of this process ----------------


class Clocks:
    """A wall clock that can step, and a monotonic clock that cannot."""

    def __init__(self, wall=10_000.0):
        self.wall, self.mono = wall, 0.0

    def advance(self, seconds):
        self.wall += seconds
        self.mono += seconds


async def test_a_wall_clock_step_forward_dead_letters_nothing_early(outbox, receiver,
                                                                   deliverers):
    clocks = Clocks(wall=0.0)
    receiver.script = [(503, {}, 0.0)] * 2
    d = deliverers(outbox, "i", receiver.url, None, (), schedule=(0, 5, 30), horizon=3600,
                   jitter=0.0, clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    await d.dispatch_due()
    await d.drain()
    clocks.advance(5)
    clocks.wall += 86400  # NTP corrects a clock a day slow
    await d.dispatch_due()
    await d.drain()
    summary = await outbox.callback_summary("d1", 1)
    # 5 s old by this process's clock, not a day: retried, not dead
    assert (summary.state, summary.attempts) == ("pending", 2)


async def test_a_wall_clock_step_back_does_not_delay_a_scheduled_try(outbox, receiver,
                                                                    deliverers):
    clocks = Clocks()
    receiver.script = [(503, {}, 0.0)]
    d = deliverers(outbox, "i", receiver.url, None, (), schedule=(0, 5), jitter=0.0,
                   clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    await d.dispatch_due()
    await d.drain()
    assert await outbox.next_due_at("i") == 10_005.0
    clocks.advance(5)
    clocks.wall -= 3600  # a clock an hour fast is corrected
    assert await d.dispatch_due() == 1  # due by this process's clock; the row says in 1 h
    await d.drain()
    assert (await outbox.callback_summary("d1", 1)).state == "delivered"


# -- issue 15 (8): a send waiting for a slot is not made once superseded ------------------


async def test_a_send_waiting_for_a_slot_is_not_made_once_a_newer_attempt_drops_it(
        outbox, receiver, deliverers):
    d = deliverers(outbox, "i", receiver.url, None, (), concurrency=1, clock=Clock())
    await d._slots.acquire()  # the only slot is busy (a slow receiver)
    assert d.deliver_now(OutboxEvent("msg_d1", "d1", 1, BODY, 0, 0.0))
    # attempt 2 is accepted meanwhile: its commit drops attempt 1's undelivered event
    await outbox.runner(Journal.insert, Job("d1", 2, "p2", "i", "{}", "f", created_at=1.0))
    d._slots.release()
    await d.drain()
    assert receiver.requests == []
    assert (await outbox.callback_summary("d1", 1)).state == "dropped"


# -- issue 18: the outbox is read when something may be due, not after every delivery ----


def count_reads(store):
    """Counts the deliverer's outbox reads (`due_events`, `next_due_at`) on `store`."""
    reads = {"due_events": 0, "next_due_at": 0}
    for name in reads:
        real = getattr(store, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            reads[_name] += 1
            return _real(*args, **kwargs)

        setattr(store, name, counted)
    return reads


async def test_delivered_jobs_cost_the_deliverer_no_outbox_read(make_harness, receiver):
    h = await make_harness()
    reads = count_reads(h.courier.store)
    deliverer = h.courier.deliverer
    deliverer.wake()  # one pass now, counted, after which the loop sleeps
    while reads["next_due_at"] == 0 or deliverer._passing:
        await asyncio.sleep(0.005)
    before = dict(reads)
    for i in range(5):
        await h.post(model_free(), f"quietread{i}")
        await receiver.wait_for(i + 1)
    await deliverer.drain()
    for _ in range(50):  # the loop's turn, had a delivery woken it
        await asyncio.sleep(0)
    assert reads == before
    assert [b["status"] for b in receiver.bodies()] == ["success"] * 5
    for i in range(5):
        assert (await h.status(f"quietread{i}"))["callback"]["state"] == "delivered"


async def test_a_recorded_retry_is_read_when_due_not_at_once(outbox, receiver, deliverers):
    clock = Clock()
    receiver.script = [(503, {}, 0.0)]
    d = deliverers(outbox, "i", receiver.url, None, (), schedule=(0, 5), jitter=0.0,
                   clock=clock, monotonic=clock)
    reads = count_reads(outbox)
    assert await d.dispatch_due() == 1
    await d.drain()
    assert not d._wake.is_set()  # no pass at once for a retry the store recorded...
    assert d._rescan_at == 5.0  # ...but one at its time, by this process's clock
    clock.now = 5.0
    await d._sleep(3600)  # returns at once: the retry is due
    assert await d.dispatch_due() == 1
    await d.drain()
    assert not d._wake.is_set()  # delivered and recorded: nothing left to read for
    assert reads == {"due_events": 2, "next_due_at": 0}
    summary = await outbox.callback_summary("d1", 1)
    assert (summary.state, summary.attempts) == ("delivered", 2)


async def test_a_held_outcome_has_the_loop_read_again_at_once(outbox, receiver, deliverers,
                                                             monkeypatch):
    clock = Clock()
    receiver.script = [(503, {}, 0.0)]
    refuse_writes(monkeypatch, states=("pending",))
    d = deliverers(outbox, "i", receiver.url, None, (), schedule=(0, 5), jitter=0.0,
                   clock=clock, monotonic=clock)
    await d.dispatch_due()
    await d.drain()
    assert d._wake.is_set()  # the row is stale: the loop works out the held time now
    assert 4.9 < await d._pass() <= 5.0


async def test_a_delivery_wakes_the_loop_when_its_last_read_could_not_exclude_it(
        outbox, receiver, deliverers, monkeypatch):
    # more events in flight than next_due_at can exclude: that read ignored what was due
    monkeypatch.setattr(delivery, "EXCLUDE_MAX", 0)
    d = deliverers(outbox, "i", receiver.url, None, (), clock=Clock())
    gate = asyncio.Event()
    real_send = d.sender.send

    async def held_send(event):
        await gate.wait()
        return await real_send(event)

    d.sender.send = held_send
    assert d.deliver_now(OutboxEvent("msg_d1", "d1", 1, BODY, 0, 0.0))
    assert await d._pass() == delivery.BLIND_WAIT
    d._wake.clear()
    gate.set()
    await d.drain()
    assert d._wake.is_set()
    assert (await outbox.callback_summary("d1", 1)).state == "delivered"


async def test_a_first_try_delivery_is_logged_at_debug_a_later_one_at_info(
        make_harness, receiver, caplog):
    caplog.set_level(logging.INFO)  # ComfyUI's default level
    h = await make_harness()
    await h.post(model_free(), "log1")
    await receiver.wait_for(1)
    receiver.script = [(503, {}, 0.0)]
    await h.post(model_free(), "log2")
    await receiver.wait_for(3)
    await h.courier.deliverer.drain()

    def lines(cid):
        return [(r.levelname, r.getMessage().split(" id=")[0]) for r in caplog.records
                if r.name.startswith("comfy_courier") and f"id={cid} " in r.getMessage()]

    # one INFO line for the job's outcome; its first-try callback adds none
    assert lines("log1") == [("INFO", "[courier] success")]
    assert lines("log2") == [("INFO", "[courier] success"),
                             ("WARNING", "[courier] callback try 1 failed"),
                             ("INFO", "[courier] callback delivered")]
