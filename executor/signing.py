"""Standard Webhooks signing for outgoing callbacks.

The maintained `standardwebhooks` library does the HMAC; this module only adds what the
spec leaves to the sender: one signature per configured secret (rotation), a fresh
timestamp on every delivery attempt, and signing the exact bytes that go on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from standardwebhooks.webhooks import Webhook


def signature_headers(
    event_id: str, body: bytes, secrets: Sequence[str], timestamp: datetime | None = None
) -> dict[str, str]:
    """Headers for one delivery attempt of `body`.

    `webhook-id` is always present (receivers de-duplicate on it, signed or not);
    `webhook-timestamp` and `webhook-signature` only when at least one secret is set.
    Several secrets yield space-separated `v1,` signatures, as the spec allows during a
    rotation, so a receiver holding either the old or the new secret verifies.
    """
    headers = {"webhook-id": event_id}
    if not secrets:
        return headers
    when = timestamp or datetime.now(timezone.utc)
    text = body.decode("utf-8")
    signatures = [Webhook(secret).sign(event_id, when, text) for secret in secrets]
    headers["webhook-timestamp"] = str(int(when.timestamp()))
    headers["webhook-signature"] = " ".join(signatures)
    return headers
