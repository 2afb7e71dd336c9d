"""Our callbacks verify with the independent `standardwebhooks` package and with a
from-the-spec HMAC: rotation, tampering, fresh timestamps per retry, stale timestamps."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from comfy_courier.executor import signing
from comfy_courier.executor.delivery import Deliverer
from comfy_courier.executor.jobs import Job, JobState, callback_body
from comfy_courier.executor.signing import signature_headers
from comfy_courier.executor.store import OutboxEvent
from comfy_courier.executor.store.sqlite.journal import Journal
from comfy_courier.executor.store.sqlite.store import SqliteStore
from comfy_courier.executor.store.sqlite.thread import JournalThread

from conftest import CALLBACK_KEY, WEBHOOK_SECRET, Received, model_free

SIGNED = ("webhook-id", "webhook-timestamp", "webhook-signature")


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def spec_signatures(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    """The Standard Webhooks v1 signature, written from the spec, not from any library."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers_of(received: Received) -> dict[str, str]:
    return {name: received.headers[name] for name in SIGNED if name in received.headers}


def verify(secret: str, body: bytes, headers: dict[str, str]) -> Any:
    return Webhook(secret).verify(body, headers)


# -- end to end: a job's callback through the harness ---------------------------------


async def test_a_job_callback_verifies_with_the_standard_webhooks_package(make_harness):
    h = await make_harness(env={"COURIER_WEBHOOK_SECRET": WEBHOOK_SECRET})
    assert (await h.post(model_free(), "sig-1"))[0] == 202
    [received] = await h.receiver.wait_for(1)
    headers = headers_of(received)
    assert set(headers) == set(SIGNED)
    assert received.headers["X-API-Key"] == CALLBACK_KEY
    payload = verify(WEBHOOK_SECRET, received.body, headers)
    assert payload["content_request_id"] == "sig-1" and payload["status"] == "success"
    # the same signature, derived from the spec by hand
    assert headers["webhook-signature"] == spec_signatures(
        WEBHOOK_SECRET, headers["webhook-id"], headers["webhook-timestamp"], received.body)
    # the timestamp is now-ish, integer seconds
    assert abs(int(headers["webhook-timestamp"]) - datetime.now(timezone.utc).timestamp()) < 60


async def test_during_rotation_either_secret_alone_verifies(make_harness):
    old, new = new_secret(), new_secret()
    h = await make_harness(env={"COURIER_WEBHOOK_SECRET": f"{old}, {new}"})
    await h.post(model_free(), "rot-1")
    [received] = await h.receiver.wait_for(1)
    headers = headers_of(received)
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    for secret in (old, new):  # a receiver that has only the old, or already only the new
        assert verify(secret, received.body, headers)["content_request_id"] == "rot-1"
        assert spec_signatures(secret, headers["webhook-id"], headers["webhook-timestamp"],
                               received.body) in signatures
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        verify(new_secret(), received.body, headers)


async def test_without_a_secret_callbacks_carry_only_a_webhook_id(make_harness):
    h = await make_harness()
    await h.post(model_free(), "plain-1")
    [received] = await h.receiver.wait_for(1)
    assert received.headers["webhook-id"].startswith("msg_")
    assert "webhook-signature" not in received.headers
    assert "webhook-timestamp" not in received.headers
    with pytest.raises(WebhookVerificationError, match="Missing required headers"):
        verify(WEBHOOK_SECRET, received.body, headers_of(received))


async def test_tampering_with_body_id_or_timestamp_fails(make_harness):
    h = await make_harness(env={"COURIER_WEBHOOK_SECRET": WEBHOOK_SECRET})
    await h.post(model_free(), "tamper-1")
    [received] = await h.receiver.wait_for(1)
    headers, body = headers_of(received), received.body
    verify(WEBHOOK_SECRET, body, headers)

    payload = json.loads(body)
    forged = dict(payload, status="error", image_url=None, error_message="forged")
    bodies = {
        "field changed": json.dumps(forged, separators=(",", ":")).encode(),
        "one byte flipped": body[:-2] + bytes([body[-2] ^ 1]) + body[-1:],
        "appended": body + b" ",
        # re-serialised with other whitespace: same JSON, other bytes. Receivers must
        # verify the raw body, before parsing it.
        "re-serialised": json.dumps(payload).encode(),
    }
    for name, tampered in bodies.items():
        with pytest.raises(WebhookVerificationError, match="No matching signature"):
            verify(WEBHOOK_SECRET, tampered, headers)
            pytest.fail(f"{name} body verified")
    other_id = dict(headers, **{"webhook-id": "msg_someone_else"})
    other_time = dict(headers, **{"webhook-timestamp": str(int(headers["webhook-timestamp"]) - 1)})
    for tampered_headers in (other_id, other_time):
        with pytest.raises(WebhookVerificationError, match="No matching signature"):
            verify(WEBHOOK_SECRET, body, tampered_headers)


async def test_the_outbox_keeps_the_body_not_the_signed_headers(make_harness, tmp_path):
    """Signatures are made per try; the journal holds nothing that could sign or replay."""
    h = await make_harness(env={"COURIER_WEBHOOK_SECRET": WEBHOOK_SECRET})
    await h.post(model_free(), "stored-1")
    [received] = await h.receiver.wait_for(1)
    await h.settle()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("journal.sqlite3*"))
    assert received.body in stored  # the exact bytes, re-sent as they are on every retry
    for value in (received.headers["webhook-signature"].split(",", 1)[1], WEBHOOK_SECRET,
                  WEBHOOK_SECRET.removeprefix("whsec_"), CALLBACK_KEY):
        assert value.encode() not in stored


# -- the Deliverer: each retry re-signed with a fresh timestamp, under the same id ---------


class SteppingDatetime(datetime):
    """`datetime` for the signing module whose now() walks through given instants."""

    instants: list[datetime] = []

    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return cls.instants.pop(0)


@pytest.fixture
async def outbox(tmp_path):
    db = JournalThread(lambda: Journal(tmp_path / "s.sqlite3"))
    store = SqliteStore(db)
    now = time.time()  # the Deliverer runs on the real clock here
    job = Job("s1", 1, "p1", "i", "{}", "f", created_at=now)
    await db(Journal.insert, job)
    job.state, job.finished_at = JobState.SUCCESS, now
    body = json.dumps(callback_body(job), separators=(",", ":")).encode()
    await db(Journal.finish, job, OutboxEvent("msg_s1", "s1", 1, body, 0, now))
    yield store
    db.close()


async def test_each_retry_is_signed_afresh_under_the_same_webhook_id(outbox, receiver,
                                                                    monkeypatch):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    first, second = now - timedelta(seconds=40), now - timedelta(seconds=5)
    monkeypatch.setattr(SteppingDatetime, "instants", [first, second])
    monkeypatch.setattr(signing, "datetime", SteppingDatetime)
    receiver.script = [(503, {}, 0.0)]  # the first try fails, the retry is due at once
    secret = new_secret()
    deliverer = Deliverer(outbox, "i", receiver.url, CALLBACK_KEY, (secret,), schedule=(0, 0),
                          jitter=0.0)
    for _ in range(2):
        assert await deliverer.dispatch_due() == 1
        await deliverer.drain()
    tries = await receiver.wait_for(2)
    assert len(tries) == 2
    assert (await outbox.callback_summary("s1", 1)).state == "delivered"

    a, b = headers_of(tries[0]), headers_of(tries[1])
    assert a["webhook-id"] == b["webhook-id"] == "msg_s1"  # receivers de-duplicate on it
    assert tries[0].body == tries[1].body  # the stored body, byte for byte
    assert a["webhook-timestamp"] == str(int(first.timestamp()))
    assert b["webhook-timestamp"] == str(int(second.timestamp()))
    await deliverer.close()
    assert a["webhook-signature"] != b["webhook-signature"]
    for received in tries:  # each try verifies on its own, within the tolerance
        verify(secret, received.body, headers_of(received))
    # a signature belongs to its own timestamp: the retry's with the first's time fails
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        verify(secret, tries[1].body, dict(b, **{"webhook-timestamp": a["webhook-timestamp"]}))


# -- stale and future timestamps ------------------------------------------------------


@pytest.mark.parametrize("offset, message", [(-6 * 60, "too old"), (6 * 60, "too new")])
def test_a_timestamp_outside_the_tolerance_is_rejected(offset, message):
    secret, body = new_secret(), b'{"content_request_id":"old-1","status":"success"}'
    when = datetime.now(timezone.utc) + timedelta(seconds=offset)
    headers = signature_headers("msg_old", body, [secret], timestamp=when)
    # correctly signed for its timestamp; refused for the time alone
    assert headers["webhook-signature"] == spec_signatures(
        secret, "msg_old", headers["webhook-timestamp"], body)
    with pytest.raises(WebhookVerificationError, match=message):
        verify(secret, body, headers)


async def test_a_captured_callback_replayed_later_is_rejected(make_harness, monkeypatch):
    h = await make_harness(env={"COURIER_WEBHOOK_SECRET": WEBHOOK_SECRET})
    await h.post(model_free(), "replay-1")
    [received] = await h.receiver.wait_for(1)
    headers = headers_of(received)
    verify(WEBHOOK_SECRET, received.body, headers)

    import standardwebhooks.webhooks as verifier

    class Later(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.now(tz) + timedelta(minutes=6)

    monkeypatch.setattr(verifier, "datetime", Later)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(WEBHOOK_SECRET, received.body, headers)


def test_several_secrets_give_space_separated_signatures_in_order():
    secrets = [new_secret() for _ in range(3)]
    when = datetime.now(timezone.utc)
    headers = signature_headers("msg_x", b"{}", secrets, timestamp=when)
    assert headers["webhook-signature"].split(" ") == [
        spec_signatures(s, "msg_x", headers["webhook-timestamp"], b"{}") for s in secrets]
    assert signature_headers("msg_x", b"{}", []) == {"webhook-id": "msg_x"}
