"""Callback delivery from the durable outbox: claim -> send -> record.

The schedule lives in the store (`next_attempt_at`), not in a sleeping coroutine, so a
restart resumes exactly where the last process stopped. Delivery is at-least-once;
receivers de-duplicate on `webhook-id`, which is stable across retries.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from .proxies import Proxies
from .signing import signature_headers
from .store import OutboxEvent, Store

log = logging.getLogger(__name__)

# In the spirit of Standard Webhooks: now, 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h,
# then every 4 h until the retry horizon (COURIER_RETRY_HORIZON, a day by default).
# Each wait varies by the deliverer's jitter (±10 %), so many hosts' retries spread out.
DEFAULT_SCHEDULE: tuple[float, ...] = (0, 5, 30, 120, 600, 1800, 3600, 7200, 14400)
GONE = 410  # the one answer that stops retries: the receiver says the endpoint is gone


@dataclass(frozen=True)
class Delivered:
    status: int


@dataclass(frozen=True)
class Retry:
    reason: str
    retry_after: float | None = None


@dataclass(frozen=True)
class Permanent:
    reason: str


Outcome = Delivered | Retry | Permanent


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def classify(
    code: int, retry_after: str | None, now: float, location: str | None = None
) -> Outcome:
    """What a receiver's answer means: delivered, retry later, or never (dead letter).

    Every non-2xx answer is retried until the horizon, 4xx included: a receiver answering
    401 because its key or secret is wrong is a mistake its operator can fix, and the
    events it refused then arrive (Stripe and Svix retry every non-2xx too). Only 410 Gone
    stops at once. Redirects are not followed (a POST's body and keys would go to another
    address) but retried: the operator fixes COURIER_CALLBACK_URL and the kept events
    then arrive.
    """
    if 200 <= code < 300:
        return Delivered(code)
    reason = f"HTTP {code}"
    if code == GONE:
        return Permanent(f"{reason} Gone: the receiver asked for no more deliveries")
    if 300 <= code < 400:
        reason += f" redirect to {location or '?'}"[:200]
        reason += "; set COURIER_CALLBACK_URL to the final address (redirects are not followed)"
    return Retry(reason, parse_retry_after(retry_after, now))


class Deliverer:
    def __init__(
        self,
        store: Store,
        instance: str,
        url: str,
        api_key: str | None,
        secrets: Sequence[str],
        *,
        schedule: Sequence[float] = DEFAULT_SCHEDULE,
        horizon: float = 86400.0,
        timeout: float = 10.0,
        concurrency: int = 8,
        jitter: float = 0.1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._instance = instance
        self._url = url
        self._api_key = api_key
        self._secrets = tuple(secrets)
        self._schedule = tuple(schedule) or (0.0,)
        self._horizon = horizon
        self._timeout = timeout
        self._jitter = jitter
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self.sent = 0
        self.failures = 0
        self.on_outcome: Callable[[str], None] = lambda outcome: None  # metrics hook

    def wake(self) -> None:
        """A new event was committed: look now instead of at the next scheduled time."""
        self._wake.set()

    _proxy: str | None = None

    def _http(self) -> aiohttp.ClientSession:
        # aiohttp, not httpx: it is ComfyUI's own HTTP stack, and a callback over it costs
        # about 0.45 ms less on loopback (benchmarks/bench_e2e.py). Proxies from the
        # environment apply, as they did with httpx: read once (proxies.py), not with
        # trust_env, which looks them up on a worker thread for every callback.
        if self._session is None or self._session.closed:
            self._proxy = Proxies().for_url(self._url)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def run(self) -> None:
        while True:
            try:
                await self.dispatch_due()
                next_at = await self._store.next_due_at(self._instance, tuple(self._in_flight))
            except Exception:  # a journal hiccup must not end delivery for good
                log.exception("[courier] outbox pass failed; retrying in 5 s")
                next_at = self._clock() + 5
            delay = 3600.0 if next_at is None else max(0.05, next_at - self._clock())
            self._wake.clear()
            # asyncio.wait, not wait_for: on Python < 3.12 wait_for can swallow a
            # cancellation that races with the event being set, and stop() would hang.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=min(delay, 3600.0))
            finally:
                waiter.cancel()

    async def dispatch_due(self, limit: int = 200) -> int:
        """Start sending every due event not already in flight; returns how many started."""
        now = self._clock()
        events = await self._store.due_events(self._instance, now, limit)
        return sum(self._start(event, check_current=True) for event in events)

    def deliver_now(self, event: OutboxEvent) -> bool:
        """Send a final event the courier has just committed, unless already in flight.

        Rather than waking the loop to read it back from the outbox, and without asking
        whether a newer attempt superseded it: none can have finished since the commit.
        """
        return self._start(event, check_current=False)

    def _start(self, event: OutboxEvent, check_current: bool) -> bool:
        if event.event_id in self._in_flight:
            return False
        self._in_flight.add(event.event_id)
        task = asyncio.ensure_future(self._deliver(event, check_current))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def drain(self) -> None:
        """Wait for the sends in flight (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _deliver(self, event: OutboxEvent, check_current: bool) -> None:
        try:
            async with self._slots:
                if check_current and not await self._store.event_still_current(event.event_id):
                    # a newer attempt of the same id exists: this event must never arrive
                    await self._store.drop_event(event.event_id, self._clock())
                    return
                outcome = await self._send(event)
                await self._record(event, outcome)
        except Exception:
            log.exception("[courier] delivering %s failed unexpectedly", event.event_id)
        finally:
            self._in_flight.discard(event.event_id)
            self.wake()  # its next try may be due before the time the loop is waiting for

    async def _send(self, event: OutboxEvent) -> Outcome:
        headers = {"Content-Type": "application/json", "User-Agent": "comfy-courier"}
        if self._api_key:
            headers["X-API-Key"] = self._api_key
        headers.update(signature_headers(event.event_id, event.body, self._secrets))
        try:
            async with self._http().post(
                self._url,
                data=event.body,
                headers=headers,
                allow_redirects=False,
                proxy=self._proxy,
            ) as response:
                await response.read()  # the whole answer, so the connection is reused
                code, retry_after = response.status, response.headers.get("Retry-After")
                location = response.headers.get("Location")
        except asyncio.TimeoutError:
            return Retry(f"no answer within {self._timeout:g} s")
        except (aiohttp.ClientError, ValueError) as e:  # ValueError: an unusable URL
            return Retry(f"{type(e).__name__}: {e}"[:300])
        return classify(code, retry_after, self._clock(), location)

    async def _record(self, event: OutboxEvent, outcome: Outcome) -> None:
        now = self._clock()
        attempts = event.attempts + 1
        self.on_outcome(type(outcome).__name__.lower())
        if isinstance(outcome, Delivered):
            self.sent += 1
            await self._store.record_delivery(event.event_id, "delivered", attempts, now)
            log.info(
                "[courier] callback delivered id=%s attempt=%s event=%s tries=%s",
                event.content_request_id,
                event.attempt,
                event.event_id,
                attempts,
            )
            return
        self.failures += 1
        if isinstance(outcome, Permanent):
            await self._store.record_delivery(
                event.event_id, "dead", attempts, now, None, outcome.reason
            )
            log.error(
                "[courier] callback dead-lettered id=%s attempt=%s event=%s: receiver answered %s",
                event.content_request_id,
                event.attempt,
                event.event_id,
                outcome.reason,
            )
            return
        delay = self._schedule[min(attempts, len(self._schedule) - 1)]
        delay *= 1 + random.uniform(-self._jitter, self._jitter)
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        next_at = now + delay
        if next_at - event.created_at > self._horizon:
            await self._store.record_delivery(
                event.event_id,
                "dead",
                attempts,
                now,
                None,
                f"gave up after {attempts} tries: {outcome.reason}",
            )
            log.error(
                "[courier] callback dead-lettered id=%s attempt=%s event=%s: "
                "retry horizon over (%s)",
                event.content_request_id,
                event.attempt,
                event.event_id,
                outcome.reason,
            )
            return
        await self._store.record_delivery(
            event.event_id,
            "pending",
            attempts,
            now,
            next_at,
            outcome.reason,
        )
        log.warning(
            "[courier] callback try %s failed id=%s event=%s: %s; next in %.0f s",
            attempts,
            event.content_request_id,
            event.event_id,
            outcome.reason,
            delay,
        )
