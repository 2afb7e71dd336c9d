"""What a receiver's answer means and when a final callback is tried next: the outcomes,
the schedule, the horizon, `Retry-After`, and what this process knows of each event
beyond its outbox row.

Two clocks, each where it belongs:
- the outbox row keeps the next try as a wall-clock time (`next_attempt_at`) and the
  event's birth as `created_at`: both outlive this process and other instances read them,
  and no monotonic clock means anything outside the process that read it;
- inside the process, every duration is measured with a monotonic clock (`Track`): how
  long until a try this process scheduled, how old an event is for the retry horizon, and
  how long an outcome the store would not take stays held in memory.

So a step of the wall clock does little: a step forward makes the rows due early (one
early try each, at-least-once anyway) but dead-letters nothing early that this process
has tried; a step back does not delay a try this process scheduled (it asks the store for
that row by its own clock). Only a step while the process is down counts, through the
rows' times. An `HTTP-date` in `Retry-After` is an absolute wall time, compared with the
wall clock as it must be.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone

# In the spirit of Standard Webhooks: now, 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h,
# then every 4 h until the retry horizon (COURIER_RETRY_HORIZON, a day by default).
# Each wait varies by the deliverer's jitter (±10 %), so many hosts' retries spread out.
DEFAULT_SCHEDULE: tuple[float, ...] = (0, 5, 30, 120, 600, 1800, 3600, 7200, 14400)
# Tries of writing an outcome (delivered, dead letter) the store refused: while this
# process lives, never giving up; the event is not sent again meanwhile.
RECORD_RETRY: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# An unreadable store before a send (the supersession check): look again this much later.
STORE_RETRY = 5.0
# A delay-seconds value too large to represent counts as 2^31 s (RFC 9111 §1.2.2).
RETRY_AFTER_MAX = 2147483648.0


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
GONE = 410  # the one answer that stops retries: the receiver says the endpoint is gone


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


@dataclass(frozen=True)
class Write:
    """An outcome for the outbox row: `Store.record_delivery`'s arguments."""

    state: str  # pending | delivered | dead
    attempts: int
    next_attempt_at: float | None  # wall clock, for the row (pending only)
    last_error: str | None
    delay: float  # seconds until the next try (pending only), by the monotonic clock


@dataclass(slots=True)
class Track:
    """One event this process has tried: what its row may not say (yet).

    `held`: the store did not take the last outcome, so the row's `next_attempt_at` is
    stale and `due` decides when the event goes again; `unrecorded` is a delivered or
    dead-lettered outcome still to be written (the event is never sent again meanwhile).
    """

    attempts: int  # tries made, counted even when the store did not record them
    seen_at: float  # monotonic time this process first tried it
    age_at_seen: float  # its age then, from the row's created_at (wall clock)
    created_at: float  # the row's; another value means the row was renewed (redelivered)
    due: float = 0.0  # monotonic time of the next try this process scheduled
    next_at: float | None = None  # the row's next_attempt_at as this process last wrote it
    held: bool = False
    unrecorded: Write | None = None
    record_due: float = 0.0  # monotonic time of the next try to write `unrecorded`
    record_failures: int = 0

    def offset(self) -> float | None:
        """Wall minus monotonic when its row's schedule was written (None: not written)."""
        return None if self.next_at is None or self.held else self.next_at - self.due

    def age(self, mono: float) -> float:
        """Seconds since the event was created, for the horizon; immune to clock steps
        after this process first saw it."""
        return self.age_at_seen + max(0.0, mono - self.seen_at)

    def hold(self, write: Write, mono: float) -> None:
        """The store refused `write`: keep its effect in memory."""
        self.held = True
        self.attempts = write.attempts
        if write.state == "pending":
            self.due = mono + write.delay
        else:
            self.due = math.inf  # delivered or dead: never sent again by this process
            self.unrecorded = write
            self.record_failures += 1
            wait = RECORD_RETRY[min(self.record_failures, len(RECORD_RETRY)) - 1]
            self.record_due = mono + wait

    def recorded(self, write: Write, mono: float) -> None:
        """The store took `write` (pending: the event stays tracked until it ends)."""
        self.held = False
        self.unrecorded = None
        self.record_failures = 0
        self.attempts = write.attempts
        self.due = mono + write.delay
        self.next_at = write.next_attempt_at


class Tracks:
    """The events this process has tried and not yet seen end, by event id.

    `held` are those whose last outcome the store did not take: their row is stale, and
    `Track.due` (or `record_due`) says when they go again. For the others the row is
    right, unless the wall clock stepped back since it was written (`stepped_back`).
    """

    def __init__(self) -> None:
        self._by_id: dict[str, Track] = {}
        self.held: set[str] = set()
        self._offset_high = -math.inf  # highest wall-minus-monotonic of a written schedule

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, event_id: object) -> bool:
        """Still tracked: this process has a next time for the event (it has not ended)."""
        return event_id in self._by_id

    def due(self, event_id: str) -> float:
        """Monotonic time of the event's next try as this process scheduled it."""
        return self._by_id[event_id].due

    def of(
        self, event_id: str, attempts: int, created_at: float, wall: float, mono: float
    ) -> Track:
        """The event's track, started now if it has none (or its row was renewed)."""
        track = self._by_id.get(event_id)
        if track is None or track.created_at != created_at:
            age = max(0.0, wall - created_at)
            track = self._by_id[event_id] = Track(attempts, mono, age, created_at)
            self.held.discard(event_id)
        track.attempts = max(track.attempts, attempts)
        return track

    def waiting(self, event_id: str, created_at: float, mono: float) -> bool:
        """Held, and not due yet by this process's clock (whatever its row says); a row
        renewed since (an operator's redelivery) is not held: its old track is dropped."""
        track = self._by_id.get(event_id)
        if track is not None and track.created_at != created_at:
            self.forget(event_id)
            return False
        return track is not None and track.held and mono < track.due

    def hold(self, event_id: str, write: Write, mono: float) -> None:
        self.held.add(event_id)
        self._by_id[event_id].hold(write, mono)

    def hold_for(self, event_id: str, seconds: float, mono: float) -> None:
        """Not sent before `seconds` pass (the store could not be read before a send)."""
        self.held.add(event_id)
        track = self._by_id[event_id]
        track.held, track.due = True, mono + seconds

    def recorded(self, event_id: str, write: Write, wall: float, mono: float) -> None:
        if write.state != "pending":
            self.forget(event_id)
            return
        self.held.discard(event_id)
        self._by_id[event_id].recorded(write, mono)
        self._offset_high = max(self._offset_high, wall - mono)

    def forget(self, event_id: str) -> None:
        self._by_id.pop(event_id, None)
        self.held.discard(event_id)

    def stepped_back(self, wall: float, mono: float, tolerance: float) -> bool:
        """Has the wall clock gone back since a schedule still tracked was written?"""
        return wall - mono < self._offset_high - tolerance

    def delays(self, mono: float, every: bool, skip: set[str]) -> list[float]:
        """Seconds until each held event (`every`: each tracked one) is due here."""
        out = []
        for event_id in self._by_id if every else self.held:
            track = self._by_id[event_id]
            if event_id in skip:
                continue
            out.append((track.record_due if track.unrecorded else track.due) - mono)
        return out

    def records_due(self, mono: float, skip: set[str]) -> list[tuple[str, Write]]:
        """Delivered or dead outcomes the store refused, due to be written again."""
        due = []
        for event_id in self.held:
            track = self._by_id[event_id]
            if event_id not in skip and track.unrecorded is not None and mono >= track.record_due:
                due.append((event_id, track.unrecorded))
        return due

    def overdue(
        self, wall: float, mono: float, skip: set[str], whole_page: bool
    ) -> dict[str, float]:
        """Events due by this process's clock that the store did not return, with the
        time their rows say; forgets those whose rows were due and did not come back
        (ended, or gone to another instance)."""
        late: dict[str, float] = {}
        for event_id, track in list(self._by_id.items()):
            if event_id in skip or track.held or track.next_at is None or mono < track.due:
                continue
            if track.next_at > wall:
                late[event_id] = track.next_at
            elif whole_page:
                self.forget(event_id)
        offsets = [t.offset() for t in self._by_id.values()]
        self._offset_high = max((o for o in offsets if o is not None), default=-math.inf)
        return late


def retry_delay(
    schedule: tuple[float, ...], attempts: int, jitter_factor: float, retry_after: float | None
) -> float:
    """Seconds before the try after `attempts` tries: the schedule's slot, jittered, never
    sooner than the receiver's Retry-After."""
    delay = schedule[min(attempts, len(schedule) - 1)] * jitter_factor
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def plan(
    track: Track,
    outcome: Outcome,
    wall: float,
    mono: float,
    schedule: tuple[float, ...],
    jitter_factor: float,
    horizon: float,
) -> Write:
    """A try's outcome as its row's next state: delivered, dead, or pending until when."""
    attempts = track.attempts + 1
    if isinstance(outcome, Delivered):
        return Write("delivered", attempts, None, None, 0.0)
    if isinstance(outcome, Permanent):
        return Write("dead", attempts, None, outcome.reason, 0.0)
    delay = retry_delay(schedule, attempts, jitter_factor, outcome.retry_after)
    if track.age(mono) + delay > horizon:
        return Write(
            "dead", attempts, None, f"gave up after {attempts} tries: {outcome.reason}", 0.0
        )
    return Write("pending", attempts, wall + delay, outcome.reason, delay)


# -- Retry-After (RFC 9110 §10.2.3): delay-seconds or an HTTP-date, anything else ignored --

_DELAY_SECONDS = re.compile(r"[0-9]+")  # 1*DIGIT: ASCII digits only, never "²" or "٣"
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"([0-9]{2}):([0-9]{2}):([0-9]{2})"
_MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}
# HTTP-date is case-sensitive and English whatever the locale: no strptime.
_IMF_FIXDATE = re.compile(rf"{_DAY}, ([0-9]{{2}}) {_MONTH} ([0-9]{{4}}) {_TIME} GMT")
_RFC850_DATE = re.compile(rf"{_LONG_DAY}, ([0-9]{{2}})-{_MONTH}-([0-9]{{2}}) {_TIME} GMT")
_ASCTIME_DATE = re.compile(rf"{_DAY} {_MONTH} ([0-9]{{2}}| [0-9]) {_TIME} ([0-9]{{4}})")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` value, or None to ignore it.

    `now` is the wall clock (an HTTP-date names a wall-clock instant).
    """
    if not value:
        return None
    value = value.strip(" \t")  # optional whitespace around a field value
    if _DELAY_SECONDS.fullmatch(value):
        return min(float(int(value)), RETRY_AFTER_MAX)
    when = _http_date(value, now)
    return None if when is None else max(0.0, when - now)


def _http_date(value: str, now: float) -> float | None:
    """An HTTP-date (IMF-fixdate, or the obsolete RFC 850 and asctime forms) as a
    timestamp; None for anything else or an impossible date."""
    try:
        if m := _IMF_FIXDATE.fullmatch(value):
            day, month, year, hh, mm, ss = m.groups()
            return _timestamp(int(year), month, int(day), hh, mm, ss)
        if m := _RFC850_DATE.fullmatch(value):
            day, month, yy, hh, mm, ss = m.groups()
            # a two-digit year more than 50 years ahead is the most recent past such year
            this_year = datetime.fromtimestamp(now, timezone.utc).year
            year = this_year - this_year % 100 + int(yy)
            if year > this_year + 50:
                year -= 100
            return _timestamp(year, month, int(day), hh, mm, ss)
        if m := _ASCTIME_DATE.fullmatch(value):
            month, day, hh, mm, ss, year = m.groups()
            return _timestamp(int(year), month, int(day.strip()), hh, mm, ss)
    except ValueError:  # 31 Feb, 25:00, ...
        return None
    return None


def _timestamp(year: int, month: str, day: int, hh: str, mm: str, ss: str) -> float:
    moment = datetime(year, _MONTHS[month], day, int(hh), int(mm), int(ss), tzinfo=timezone.utc)
    return moment.timestamp()
