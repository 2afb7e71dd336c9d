"""Redelivery of dead-lettered callbacks, for an operator who has fixed the receiver.

An event is dead when its receiver answered 410 Gone or kept failing until
COURIER_RETRY_HORIZON. `POST /courier/redeliver` puts one id's dead event, or every event
dead-lettered since a time, back in the outbox under the same `webhook-id` (receivers
de-duplicate on it); the instance that took the request sends them on the usual schedule.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from typing import Any

from .delivery import Deliverer
from .errors import BadRequest, Conflict, NotFound
from .intake import check_id
from .store import OutboxEvent, Store

log = logging.getLogger(__name__)

LISTED = 1000  # events named in one answer; the count is always complete


def parse_request(raw: bytes) -> tuple[str | None, float | None]:
    """`{"content_request_id": "…"}` or `{"since": <unix seconds or ISO 8601>}`, exactly one.

    `since` without a time zone is UTC.
    """
    try:
        body = json.loads(raw or b"null")
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from e
    if not isinstance(body, dict) or set(body) not in ({"content_request_id"}, {"since"}):
        raise BadRequest(
            'send {"content_request_id": "<id>"} for one job, or {"since": <unix seconds or '
            "ISO 8601 time>} for every callback dead-lettered since then"
        )
    if "content_request_id" in body:
        cid = body["content_request_id"]
        if not isinstance(cid, str):
            raise BadRequest("content_request_id must be a string")
        return check_id(cid), None
    return None, parse_time(body["since"])


def parse_time(value: Any) -> float:
    """Unix seconds from a number or an ISO 8601 string (UTC when it names no zone)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value) and value >= 0:
            return float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):  # fromisoformat reads "Z" only from Python 3.11
            text = text[:-1] + "+00:00"
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            return when.timestamp()
    raise BadRequest(
        f"since={value!r}: give unix seconds or an ISO 8601 time such as 2026-11-25T10:00:00Z"
    )


async def redeliver(
    store: Store,
    deliverer: Deliverer | None,
    instance: str,
    now: float,
    *,
    content_request_id: str | None = None,
    dead_since: float | None = None,
) -> list[OutboxEvent]:
    """Dead events back to pending, sent by `deliverer`; the events moved, oldest first.

    For one id: 404 if the id is unknown, 409 if its latest attempt's callback is not dead.
    """
    if deliverer is None:
        raise Conflict(
            "COURIER_CALLBACK_URL is not set on this ComfyUI: nothing could be redelivered"
        )
    if content_request_id is None:
        events = await store.redeliver_dead(instance, now, None, dead_since)
    else:
        job = await store.latest(content_request_id)
        if job is None:
            raise NotFound(f"no job with content_request_id {content_request_id!r}")
        events = await store.redeliver_dead(instance, now, content_request_id, None)
        if not events:
            summary = await store.callback_summary(content_request_id, job.attempt)
            state = summary.state if summary is not None else "none"
            raise Conflict(
                f"the callback of {content_request_id!r} (attempt {job.attempt}) is {state}, "
                "not dead: nothing to redeliver",
                callback_state=state,
            )
    if events:
        if content_request_id is not None:
            which = f"id={content_request_id}"
        elif dead_since is not None:
            when = datetime.fromtimestamp(dead_since, timezone.utc)
            which = f"dead since {when:%Y-%m-%dT%H:%M:%SZ}"
        else:
            which = "every dead letter"
        log.info("[courier] redelivering %d dead callback(s): %s", len(events), which)
        deliverer.wake()
    return events


def answer(events: list[OutboxEvent]) -> dict[str, Any]:
    """The route's body: how many, and which (the first LISTED)."""
    return {
        "redelivered": len(events),
        "events": [
            {
                "content_request_id": e.content_request_id,
                "attempt": e.attempt,
                "webhook_id": e.event_id,
            }
            for e in events[:LISTED]
        ],
    }
