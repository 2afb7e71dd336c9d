"""The deliverer against a real loopback receiver: outcomes, schedule, headers."""

import json

import pytest

from comfy_courier.executor.delivery import (
    Delivered,
    Deliverer,
    Permanent,
    Retry,
    classify,
    parse_retry_after,
)
from comfy_courier.executor.jobs import Job, JobState, callback_body
from comfy_courier.executor.journal import Journal, OutboxEvent
from comfy_courier.executor.journal_thread import JournalThread


@pytest.mark.parametrize("status, kind", [(200, Delivered), (204, Delivered), (301, Retry),
                                          (400, Permanent), (401, Permanent), (410, Permanent),
                                          (408, Retry), (425, Retry), (429, Retry), (500, Retry),
                                          (503, Retry)])
def test_classify(status, kind):
    assert isinstance(classify(status, None, 0.0), kind)


def test_retry_after_seconds_and_dates():
    assert parse_retry_after("120", 0) == 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10
    assert parse_retry_after("soon", 0) is None


# a real final callback body: the receiver checks what it gets against the OpenAPI document
BODY = json.dumps(callback_body(Job("d1", 1, "p1", "i", "{}", "f", state=JobState.SUCCESS,
                                    created_at=0.0))).encode()


@pytest.fixture
async def outbox(tmp_path):
    db = JournalThread(lambda: Journal(tmp_path / "d.sqlite3"))
    job = Job("d1", 1, "p1", "i", "{}", "f", created_at=0.0)
    await db(Journal.insert, job)
    job.state, job.finished_at = JobState.SUCCESS, 0.0
    await db(Journal.finish, job, OutboxEvent("msg_d1", "d1", 1, BODY, 0, 0.0))
    yield db
    db.close()


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
                  jitter=0.0, clock=clock)
    assert await d.dispatch_due() == 1
    await d.drain()
    assert await outbox(Journal.next_due_at, "i") == 40.0  # max(5, Retry-After 40)
    clock.now = 40.0
    await d.dispatch_due()
    await d.drain()
    summary = await outbox(Journal.callback_summary, "d1", 1)
    assert summary.state == "dead" and summary.attempts == 2  # 40 + 30 > 60 s horizon
    assert len(receiver.requests) == 2


async def test_slow_receiver_times_out_and_is_retried(outbox, receiver, deliverers):
    receiver.script = [(200, {}, 1.0)]
    d = deliverers(outbox, "i", receiver.url, None, (), schedule=(0, 0), timeout=0.2,
                  jitter=0.0, clock=Clock())
    await d.dispatch_due()
    await d.drain()
    summary = await outbox(Journal.callback_summary, "d1", 1)
    assert summary.state == "pending" and "no answer" in summary.last_error
    await d.dispatch_due()
    await d.drain()
    assert (await outbox(Journal.callback_summary, "d1", 1)).state == "delivered"


async def test_unreachable_receiver_is_retried(outbox, deliverers):
    d = deliverers(outbox, "i", "http://127.0.0.1:9/callback", None, (), schedule=(0, 5),
                  clock=Clock())
    await d.dispatch_due()
    await d.drain()
    summary = await outbox(Journal.callback_summary, "d1", 1)
    assert summary.state == "pending" and summary.attempts == 1


async def test_a_fresh_event_is_sent_at_once_and_only_once(outbox, receiver, deliverers):
    d = deliverers(outbox, "i", receiver.url, None, (), jitter=0.0, clock=Clock())
    event = OutboxEvent("msg_d1", "d1", 1, BODY, 0, 0.0)
    assert d.deliver_now(event) is True
    assert d.deliver_now(event) is False  # already in flight
    assert await d.dispatch_due() == 0  # the outbox pass skips it too
    await d.drain()
    assert len(receiver.requests) == 1
    assert (await outbox(Journal.callback_summary, "d1", 1)).state == "delivered"


async def test_a_redirect_is_not_followed_but_retried_with_its_target(outbox, receiver, deliverers):
    # e.g. Vercel sending http:// to https:// with a 308: the fix is the URL, and the kept
    # event arrives once it is fixed
    receiver.script = [(308, {"Location": "https://app.example/api/comfy-callback"}, 0.0)]
    d = deliverers(outbox, "i", receiver.url, "k", (), schedule=(0, 5), jitter=0.0,
                  clock=Clock())
    await d.dispatch_due()
    await d.drain()
    summary = await outbox(Journal.callback_summary, "d1", 1)
    assert summary.state == "pending" and len(receiver.requests) == 1
    assert "HTTP 308 redirect to https://app.example/api/comfy-callback" in summary.last_error
    assert "COURIER_CALLBACK_URL" in summary.last_error
