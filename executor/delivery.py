"""Callback delivery from the durable outbox: claim -> send -> record.

The schedule lives in the store (`next_attempt_at`), not in a sleeping coroutine, so a
restart resumes exactly where the last process stopped. Delivery is at-least-once;
receivers de-duplicate on `webhook-id`, which is stable across retries.

Every path through a delivery advances its schedule: a try whose outcome the store would
not record (a full disk, a lost journal answer) is held in memory until its next due time
(delivery_schedule.py), counted and dead-lettered at the horizon like any other; an
unusable answer is a retry; nothing re-sends at once. After a store failure anywhere
(`rescan_soon`) the deliverer reads the outbox again within a second: what the failed
call committed may be due now.

The outbox is read when something may have become due that the deliverer does not know
of: at the time its last read said, when told of a new event (`wake`), after a store
failure, and after a try that left its event pending or held. A try that ended its event
(delivered, dead-lettered, dropped) and was recorded changes nothing the last read
excluded it from, so the usual job's life costs no outbox read at all: its final event
is handed over by `deliver_now`, sent, and recorded.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .delivery_schedule import (
    DEFAULT_SCHEDULE,
    GONE,
    STORE_RETRY,
    Delivered,
    Outcome,
    Permanent,
    Retry,
    Track,
    Tracks,
    Write,
    classify,
    parse_retry_after,
    plan,
)
from .delivery_send import CallbackSender, log_outcome
from .store import OutboxEvent, Store

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SCHEDULE", "GONE", "Deliverer", "Delivered", "Permanent", "Retry", "classify",
    "parse_retry_after",
]  # fmt: skip

RESCAN_DELAY = 1.0  # after a store failure elsewhere: read the outbox again this soon
IDLE_WAIT = 3600.0  # the longest sleep with nothing due
EXCLUDE_MAX = 500  # ids passed to next_due_at (older SQLite allows 999 variables)
BLIND_WAIT = 60.0  # the longest sleep when not every id in flight or held was excluded
STEP_TOLERANCE = 2.0  # s of wall-clock drift against the monotonic clock not called a step
SWEEP_INTERVAL = 600.0  # forget tracked events the outbox no longer holds as pending


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
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._instance = instance
        self.sender = CallbackSender(url, api_key, secrets, timeout, clock)
        self._schedule = tuple(schedule) or (0.0,)
        self._horizon = horizon
        self._jitter = jitter
        self.clock = clock  # wall: the store's times, Retry-After dates
        self.monotonic = monotonic  # every duration measured in this process
        self._slots = asyncio.Semaphore(concurrency)
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._nudge = asyncio.Event()  # the rescan time changed: sleep less
        self._rescan_at: float | None = None
        self._passing = False
        self._failed_during_pass = False
        self._blind = False  # the last read could not exclude every event in flight
        self._tracks = Tracks()  # events this process has tried, still pending
        self._next_sweep = 0.0
        self.sent = 0
        self.failures = 0
        self.on_outcome: Callable[[str], None] = lambda outcome: None  # metrics hook

    def wake(self) -> None:
        """A new event was committed: look now instead of at the next scheduled time."""
        self._wake.set()

    def rescan_soon(self) -> None:
        """A store call failed somewhere: what it committed unanswered may be due now.

        Not a wake: a failing store must not turn the loop into a tight one. A pass that
        fails itself retries after STORE_RETRY instead.
        """
        if self._passing:
            self._failed_during_pass = True
            return
        self._read_by(self.monotonic() + RESCAN_DELAY)

    def _read_by(self, at: float) -> None:
        """Read the outbox again by monotonic time `at` at the latest."""
        if self._rescan_at is None or at < self._rescan_at:
            self._rescan_at = at
            self._nudge.set()

    async def close(self) -> None:
        await self.sender.close()

    # -- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()  # before the pass: a wake during it means look again
            self._rescan_at = None
            self._passing, self._failed_during_pass = True, False
            try:
                delay = await self._pass()
                failures = 0
            except Exception:  # a journal hiccup must not end delivery for good
                failures += 1
                if failures == 1:
                    log.exception("[courier] outbox pass failed; retrying in %g s", STORE_RETRY)
                else:
                    log.error("[courier] outbox pass failed (%d in a row)", failures)
                delay = STORE_RETRY
            finally:
                self._passing = False
            if failures == 0 and self._failed_during_pass:
                self.rescan_soon()
            await self._sleep(delay)

    async def _pass(self) -> float:
        """Start what is due; seconds until something may be due next."""
        await self.dispatch_due()
        excluded = (*self._in_flight, *self._tracks.held)
        complete = len(excluded) <= EXCLUDE_MAX
        self._blind = not complete
        next_at = await self._store.next_due_at(self._instance, excluded[:EXCLUDE_MAX])
        wall, mono = self.clock(), self.monotonic()
        delays = [BLIND_WAIT] if not complete else []
        if next_at is not None and (complete or next_at > wall):
            delays.append(next_at - wall)
        # held events, or after a step back every tracked one: due by this process's clock
        every = self._tracks.stepped_back(wall, mono, STEP_TOLERANCE)
        delays += self._tracks.delays(mono, every, self._in_flight)
        return min(max(min(delays, default=IDLE_WAIT), 0.05), IDLE_WAIT)

    async def _sleep(self, delay: float) -> None:
        """Until `delay` passes, something new is committed, or a rescan is due."""
        end = self.monotonic() + delay
        while not self._wake.is_set():
            self._nudge.clear()
            if self._rescan_at is not None:
                end = min(end, self._rescan_at)
            remaining = end - self.monotonic()
            if remaining <= 0:
                return
            # asyncio.wait, not wait_for: on Python < 3.12 wait_for can swallow a
            # cancellation that races with the event being set, and stop() would hang.
            waiters = {asyncio.ensure_future(self._wake.wait()),
                       asyncio.ensure_future(self._nudge.wait())}  # fmt: skip
            try:
                done, _ = await asyncio.wait(
                    waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if not done:
                return

    # -- choosing what to send --------------------------------------------------------------

    async def dispatch_due(self, limit: int = 200) -> int:
        """Start sending every due event not already in flight; returns how many started."""
        wall, mono = self.clock(), self.monotonic()
        page = limit + len(self._tracks.held)
        events = await self._store.due_events(self._instance, wall, page)
        due = [e for e in events if not self._tracks.waiting(e.event_id, e.created_at, mono)]
        for event_id, write in self._tracks.records_due(mono, self._in_flight):
            self._spawn(event_id, self._rewrite(event_id, write))
        started = sum(self._start(event, check_current=True) for event in due)
        if self._tracks.stepped_back(wall, mono, STEP_TOLERANCE) or mono >= self._next_sweep:
            self._next_sweep = mono + SWEEP_INTERVAL
            skip = self._in_flight | {event.event_id for event in events}
            started += await self._dispatch_overdue(wall, mono, skip, len(events) < page)
        return started

    async def _dispatch_overdue(
        self, wall: float, mono: float, skip: set[str], whole_page: bool
    ) -> int:
        """Tracked events due by this process's clock whose rows say later: after a step of
        the wall clock back, they are asked for by the time their rows say."""
        late = self._tracks.overdue(wall, mono, skip, whole_page)
        if not late:
            return 0
        page = 200 + len(late)
        events = await self._store.due_events(self._instance, max(late.values()), page)
        started = sum(
            self._start(event, check_current=True)
            for event in events
            if late.pop(event.event_id, None) is not None
        )
        if len(events) < page:
            for event_id in late:  # no longer pending here
                self._tracks.forget(event_id)
        return started

    def deliver_now(self, event: OutboxEvent) -> bool:
        """Send a final event the courier has just committed, unless already in flight.

        Rather than waking the loop to read it back from the outbox. Whether a newer
        attempt superseded it is asked only if it has to wait for a delivery slot: none
        can have been accepted between the commit and a send that starts at once.
        """
        return self._start(event, check_current=False)

    def _start(self, event: OutboxEvent, check_current: bool) -> bool:
        if event.event_id in self._in_flight:
            return False
        self._spawn(event.event_id, self._deliver(event, check_current))
        return True

    def _spawn(self, event_id: str, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` for the event, which counts as in flight until it ends."""
        self._in_flight.add(event_id)
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the sends in flight (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- one try ----------------------------------------------------------------------------

    async def _deliver(self, event: OutboxEvent, check_current: bool) -> None:
        tried = False
        try:
            track = self._tracks.of(
                event.event_id, event.attempts, event.created_at, self.clock(), self.monotonic()
            )
            # A send that waits for a slot may be superseded meanwhile (a newer attempt of
            # its id accepted): then it is asked just before it would go out.
            check_current = check_current or self._slots.locked()
            async with self._slots:
                if check_current and not await self._still_current(event, track):
                    tried = True
                    return
                try:
                    outcome = await self.sender.send(event)
                except Exception as e:  # never a reason to send again at once
                    log.exception("[courier] sending %s failed unexpectedly", event.event_id)
                    outcome = Retry(f"{type(e).__name__}: {e}"[:300])
                await self._record(event, track, outcome)
                tried = True
        except Exception:
            log.exception("[courier] delivering %s failed unexpectedly", event.event_id)
        finally:
            self._in_flight.discard(event.event_id)
            self._after_try(event.event_id, tried)

    def _after_try(self, event_id: str, tried: bool) -> None:
        """What the loop must learn from a try, without reading the outbox for nothing.

        A try that ended its event (recorded as delivered or dead, or dropped) leaves the
        loop's schedule as its last read made it: that read excluded the event in flight.
        A retry the store recorded is due at a time this process knows: the loop reads
        then. Anything else (a held outcome, a try cut short, a last read that could not
        exclude every event in flight) has it read again now.
        """
        if not tried or self._blind or event_id in self._tracks.held:
            self.wake()
        elif event_id in self._tracks:
            self._read_by(self._tracks.due(event_id))

    async def _still_current(self, event: OutboxEvent, track: Track) -> bool:
        """False (and the event dropped) once a newer attempt of its id exists (or the
        event ended elsewhere)."""
        try:
            if await self._store.event_still_current(event.event_id):
                return True
            await self._store.drop_event(event.event_id, self.clock())
        except Exception as e:
            self._tracks.hold_for(event.event_id, STORE_RETRY, self.monotonic())
            log.warning(
                "[courier] could not check callback event %s before sending (%s); "
                "looking again in %g s",
                event.event_id,
                e,
                STORE_RETRY,
            )
            return False
        self._tracks.forget(event.event_id)
        # Counted once, where the newer attempt was accepted (Admission): its commit is
        # what dropped this event.
        log.info(
            "[courier] callback not sent id=%s attempt=%s event=%s: no longer pending "
            "(superseded by a newer attempt of the id)",
            event.content_request_id,
            event.attempt,
            event.event_id,
        )
        return False

    async def _record(self, event: OutboxEvent, track: Track, outcome: Outcome) -> None:
        wall, mono = self.clock(), self.monotonic()
        self.on_outcome(type(outcome).__name__.lower())
        jitter = 1 + random.uniform(-self._jitter, self._jitter)
        write = plan(track, outcome, wall, mono, self._schedule, jitter, self._horizon)
        if isinstance(outcome, Delivered):
            self.sent += 1
        else:
            self.failures += 1
        log_outcome(event, write, outcome)
        try:
            await self._store.record_delivery(
                event.event_id, write.state, write.attempts, wall, write.next_attempt_at,
                write.last_error,
            )  # fmt: skip
        except Exception as e:
            self._tracks.hold(event.event_id, write, mono)
            log.error(
                "[courier] could not record try %s of callback id=%s event=%s as %s (%s); "
                "held in memory: %s",
                write.attempts,
                event.content_request_id,
                event.event_id,
                write.state,
                e,
                f"next try in {write.delay:.0f} s"
                if write.state == "pending"
                else "not sent again; recording it again shortly",
            )
            return
        self._tracks.recorded(event.event_id, write, wall, mono)

    async def _rewrite(self, event_id: str, write: Write) -> None:
        """Write again a delivered or dead outcome the store refused (never sent again)."""
        try:
            await self._store.record_delivery(
                event_id, write.state, write.attempts, self.clock(), None, write.last_error
            )
        except Exception as e:
            self._tracks.hold(event_id, write, self.monotonic())
            log.warning(
                "[courier] recording callback event %s as %s failed again (%s)",
                event_id,
                write.state,
                e,
            )
        else:
            self._tracks.forget(event_id)
            log.info("[courier] callback event %s recorded as %s", event_id, write.state)
        finally:
            self._in_flight.discard(event_id)
            self.wake()
