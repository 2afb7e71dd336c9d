"""Dead letters an operator can recover: the journal's redelivery, the deliverer, the route."""

from __future__ import annotations

import logging

import pytest

from comfy_courier.executor.delivery import Deliverer
from comfy_courier.executor.errors import BadRequest
from comfy_courier.executor.jobs import Job, JobState
from comfy_courier.executor.redelivery import parse_request, parse_time
from comfy_courier.executor.store import OutboxEvent
from comfy_courier.executor.store.sqlite.journal import Journal
from comfy_courier.executor.store.sqlite.store import SqliteStore

from conftest import API_KEY, BODY, journal_with_one_event, model_free

# -- the journal -----------------------------------------------------------------------


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "r.sqlite3")
    yield j
    j.close()


def final(journal: Journal, cid: str, attempt: int = 1, instance: str = "a:1",
          outbox_state: str = "dead", at: float = 100.0) -> str:
    """A final attempt of `cid` whose callback event ended in `outbox_state` at `at`."""
    job = Job(cid, attempt, f"p-{cid}-{attempt}", instance, "{}", "f", created_at=1.0)
    journal.insert(job)
    job.state, job.finished_at = JobState.SUCCESS, at - 10
    event_id = f"msg_{cid}_{attempt}"
    journal.finish(job, OutboxEvent(event_id, cid, attempt, b'{"n":1}', 0, at - 10))
    if outbox_state != "pending":
        journal.record_delivery(event_id, outbox_state, 9, at, None, "HTTP 401")
    return event_id


def row(journal: Journal, event_id: str) -> dict:
    found = journal._db.execute("SELECT * FROM outbox WHERE event_id = ?", (event_id,)).fetchone()
    return dict(found)


def test_one_ids_dead_event_goes_back_to_pending_under_the_same_id(journal):
    event_id = final(journal, "j1", instance="gone:1")
    other = final(journal, "j2")
    [event] = journal.redeliver_dead("b:2", 500.0, "j1")
    assert (event.event_id, event.content_request_id, event.attempt) == (event_id, "j1", 1)
    assert event.body == b'{"n":1}' and event.attempts == 0 and event.created_at == 500.0
    moved = row(journal, event_id)
    assert moved["state"] == "pending" and moved["attempts"] == 0
    assert moved["next_attempt_at"] == 500.0 and moved["created_at"] == 500.0  # new horizon
    assert moved["instance"] == "b:2" and moved["last_error"] is None  # the asker sends it
    assert [e.event_id for e in journal.due_events("b:2", 500.0, 10)] == [event_id]
    assert row(journal, other)["state"] == "dead"  # only the id asked for


def test_since_takes_every_event_dead_at_or_after_it(journal):
    early = final(journal, "early", at=100.0)
    late = final(journal, "late", at=200.0)
    later = final(journal, "later", at=300.0, instance="other:1")
    final(journal, "ok", at=250.0, outbox_state="delivered")
    final(journal, "waiting", at=250.0, outbox_state="pending")
    events = journal.redeliver_dead("a:1", 400.0, None, 200.0)
    assert [e.event_id for e in events] == [late, later]  # oldest first
    assert row(journal, early)["state"] == "dead"
    assert journal.outbox_counts() == {"dead": 1, "pending": 3, "delivered": 1}


def test_an_older_attempts_dead_event_is_never_redelivered(journal):
    old = final(journal, "j1", attempt=1)
    journal.insert(Job("j1", 2, "p-j1-2", "a:1", "{}", "f", created_at=2.0))
    assert journal.redeliver_dead("a:1", 400.0, "j1") == []
    assert journal.redeliver_dead("a:1", 400.0, None, 0.0) == []
    assert row(journal, old)["state"] == "dead"


def test_parse_request_takes_one_id_or_one_time():
    assert parse_request(b'{"content_request_id": "abc-1"}') == ("abc-1", None)
    assert parse_request(b'{"since": 1764064800}') == (None, 1764064800.0)
    assert parse_request(b'{"since": "2025-11-25T10:00:00Z"}') == (None, 1764064800.0)
    assert parse_time("2025-11-25T10:00:00") == 1764064800.0  # no zone: UTC
    assert parse_time("2025-11-25T11:00:00+01:00") == 1764064800.0
    for bad in (b"", b"[]", b"{}", b'{"content_request_id": "a", "since": 1}', b"{nope",
                b'{"content_request_id": "a/b"}', b'{"content_request_id": 5}',
                b'{"since": "yesterday"}', b'{"since": -1}', b'{"since": true}',
                b'{"since": null}', b'{"other": 1}'):
        with pytest.raises(BadRequest):
            parse_request(bad)


# -- the deliverer: a receiver that refused for a day, then fixed ----------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_401_is_retried_to_the_horizon_then_redelivered_with_its_webhook_id(tmp_path,
                                                                                   receiver):
    db = await journal_with_one_event(tmp_path / "d.sqlite3")
    clock = Clock()
    store = SqliteStore(db)
    deliverer = Deliverer(store, "i", receiver.url, "k", (), schedule=(0, 5, 30), horizon=60,
                          jitter=0.0, clock=clock, monotonic=clock)
    try:
        receiver.script = [(401, {}, 0.0)] * 3
        for now in (0.0, 5.0, 35.0):  # tries at 0, 5 and 35 s; the next (65 s) is past 60 s
            clock.now = now
            assert await deliverer.dispatch_due() == 1
            await deliverer.drain()
        summary = await store.callback_summary("d1", 1)
        assert summary.state == "dead" and summary.attempts == 3
        assert summary.last_error == "gave up after 3 tries: HTTP 401"

        clock.now = 1000.0  # the receiver's key is fixed
        [event] = await store.redeliver_dead("i", clock.now, "d1")
        assert await deliverer.dispatch_due() == 1
        await deliverer.drain()
        assert (await store.callback_summary("d1", 1)).state == "delivered"
        assert [r.headers["webhook-id"] for r in receiver.requests] == ["msg_d1"] * 4
        assert receiver.requests[-1].body == BODY
    finally:
        await deliverer.close()
        db.close()


# -- the route -------------------------------------------------------------------------


async def redeliver(h, body, key=API_KEY):
    headers = {"X-API-Key": key} if key else {}
    resp = await h.client.post("/courier/redeliver", json=body, headers=headers)
    return resp.status, await resp.json()


async def dead_job(h, cid: str) -> None:
    """A job whose callback the receiver refused for good (410 Gone)."""
    h.receiver.script.append((410, {}, 0.0))
    await h.post(model_free(), cid)
    await h.wait_final(cid)
    await h.settle()
    assert (await h.status(cid))["callback"]["state"] == "dead"


async def test_route_redelivers_one_id_under_its_webhook_id(make_harness, caplog):
    h = await make_harness()
    await dead_job(h, "rd1")
    first_id = h.receiver.requests[-1].headers["webhook-id"]
    caplog.set_level(logging.INFO, logger="comfy_courier")
    status, body = await redeliver(h, {"content_request_id": "rd1"})
    assert status == 200, body
    assert body == {"redelivered": 1, "events": [
        {"content_request_id": "rd1", "attempt": 1, "webhook_id": first_id}]}
    await h.receiver.wait_for(2)
    await h.settle()
    assert [r.headers["webhook-id"] for r in h.receiver.requests] == [first_id, first_id]
    assert h.receiver.requests[0].body == h.receiver.requests[1].body
    assert (await h.status("rd1"))["callback"] == {"state": "delivered", "attempts": 1,
                                                    "last_error": None}
    assert "redelivering 1 dead callback(s): id=rd1" in caplog.text
    # delivered now: asking again is a conflict, and says why
    status, body = await redeliver(h, {"content_request_id": "rd1"})
    assert status == 409 and body["error"]["callback_state"] == "delivered"


async def test_route_redelivers_everything_dead_since_a_time(make_harness):
    h = await make_harness()
    await dead_job(h, "rs1")
    await dead_job(h, "rs2")
    status, body = await redeliver(h, {"since": "2000-01-01T00:00:00Z"})
    assert status == 200 and body["redelivered"] == 2
    assert {e["content_request_id"] for e in body["events"]} == {"rs1", "rs2"}
    await h.receiver.wait_for(4)
    await h.settle()
    for cid in ("rs1", "rs2"):
        assert (await h.status(cid))["callback"]["state"] == "delivered"
    status, body = await redeliver(h, {"since": h.courier.clock() + 3600})
    assert (status, body) == (200, {"redelivered": 0, "events": []})


@pytest.mark.parametrize("body, status, error_type", [
    ({"content_request_id": "nobody"}, 404, "not_found"),
    ({"content_request_id": "../x"}, 400, "invalid_request"),
    ({"since": "last tuesday"}, 400, "invalid_request"),
    ({}, 400, "invalid_request"),
])
async def test_route_refusals(make_harness, body, status, error_type):
    h = await make_harness()
    got_status, got = await redeliver(h, body)
    assert (got_status, got["error"]["type"]) == (status, error_type)


async def test_route_needs_the_key_and_a_callback_url(make_harness):
    polling_only = await make_harness(with_receiver=False)
    assert (await redeliver(polling_only, {"since": 0}, key=None))[0] == 401
    assert (await redeliver(polling_only, {"since": 0}, key="wrong-key-0123456789"))[0] == 401
    status, body = await redeliver(polling_only, {"since": 0})
    assert status == 409 and "COURIER_CALLBACK_URL" in body["error"]["message"]
    resp = await polling_only.client.post("/api/courier/redeliver", json={"since": 0},
                                          headers={"X-API-Key": API_KEY})
    assert resp.status == 409  # ComfyUI's /api alias answers the same
