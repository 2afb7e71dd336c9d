"""The store interface: every durable operation the courier needs, as one typed protocol.

The courier never talks to a database directly; it calls a `Store`. The SQLite journal
(`store/sqlite/`, the embedded default) implements it; a backend for several hosts is one
more module implementing the same methods with the same guarantees:

- each method is one transaction, committed before it returns (the caller tells nobody
  about a change before that);
- `finish` writes a job's final state and its outbox event together, and only once per
  attempt (False when another path finished it first);
- writes are applied in the order they were called from the loop: `record_image` is
  queued at once and commits before any write called after it (a job's `finish` never
  overtakes its image rows);
- a run's writes carry its claim's `epoch` (the fencing token): a run another process
  has taken over can change nothing (its writes answer False);
- a failed call raises `StoreError` (it may or may not have been written), except
  `DuplicateAttempt` for an attempt that exists already.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar, runtime_checkable

from ..jobs import CallbackSummary, Job, JobState, Output

R = TypeVar("R")


class DuplicateAttempt(Exception):
    """Another request inserted this (content_request_id, attempt) first."""


def next_attempts(jobs: list[Job], latest: dict[str, Job]) -> tuple[list[Job | int], list[Job]]:
    """The duplicate rule for a lot of admissions, the same for every backend.

    `latest` holds each id's latest attempt in the store (it is updated: a later job of
    the lot sees an earlier one). Per job, the answer is the attempt that blocks it (it
    runs, succeeded, or holds another workflow), else the attempt number it gets; also
    the rows to insert. `jobs` are not changed: they may be copies.
    """
    results: list[Job | int] = []
    accepted: list[Job] = []
    for job in jobs:
        prior = latest.get(job.content_request_id)
        if prior is not None and prior.blocks(job.fingerprint):
            results.append(prior)
            continue
        row = replace(job, attempt=prior.attempt + 1 if prior is not None else 1)
        latest[job.content_request_id] = row
        accepted.append(row)
        results.append(row.attempt)
    return results, accepted


@dataclass(frozen=True)
class OutboxEvent:
    """A final callback waiting for delivery: the exact body is stored, never the headers."""

    event_id: str
    content_request_id: str
    attempt: int
    body: bytes
    attempts: int
    created_at: float


class Store(Protocol):
    @property
    def kind(self) -> str:
        """Where the store runs, for /courier/health ("process", "thread", ...)."""
        ...

    on_lost: Callable[[], None] | None
    """Told when calls were lost in flight (written or not): the courier rescans."""

    on_failure: Callable[[], None] | None
    """Told after any call failed (written or not): the deliverer reads the outbox again
    soon, since what such a call committed may be due and nothing else will say so."""

    def claim_instance(self, name: str) -> bool:
        """Hold the instance name for this process's life; False if a live one holds it."""
        ...

    def release_instance(self) -> None:
        """Let another process take the name (this one stops courier work)."""
        ...

    # -- jobs ---------------------------------------------------------------------------

    async def admit(
        self, job: Job, then: Callable[[Job | int], R], after: Callable[[R], None]
    ) -> R:
        """Insert `job` as the next attempt of its id unless the latest attempt blocks it.

        `then` gets the blocking attempt or the new attempt number on the loop as soon as
        the commit is done, even if the caller was cancelled meanwhile; `after` gets
        `then`'s value just after the caller has resumed with it.
        """
        ...

    async def latest(self, content_request_id: str) -> Job | None: ...

    async def count_unfinished(self) -> int: ...

    async def unfinished(self, instance: str) -> list[Job]: ...

    async def set_state(
        self, prompt_id: str, state: JobState, *, epoch: int | None = None, **fields: Any
    ) -> bool:
        """Move an unfinished job to another unfinished state; False if it is final, or
        if `epoch` (the run's fencing token) is no longer the job's."""
        ...

    async def request_cancel(self, content_request_id: str, attempt: int) -> bool: ...

    async def cancel_requests(self, instance: str) -> list[str]: ...

    async def resubmitted(
        self, old_prompt_id: str, new_prompt_id: str, now: float, *, count_run: bool
    ) -> int | None:
        """The unfinished job runs again under a new prompt_id, queued: its new epoch; None
        if it ended meanwhile. `count_run`: it was executing when its process died, so
        `runs` + 1."""
        ...

    async def reclaim(self, prompt_id: str, epoch: int) -> int | None:
        """Take over a run as it is (uploads resume): its new epoch; None if it moved on."""
        ...

    async def fenced(self, instance: str, runs: list[tuple[str, int]]) -> list[str]:
        """Of `runs` (prompt_id, epoch), those `instance` may no longer write."""
        ...

    async def finish(self, job: Job, event: OutboxEvent | None) -> bool:
        """The final state and its event, if `job.epoch` is current and it is not final."""
        ...

    async def prune(self, finished_before: float, limit: int) -> int: ...

    # -- images -------------------------------------------------------------------------

    def record_image(self, job: Job, seq: int, output: Output) -> asyncio.Future[bool]:
        """Queued now, in order with later writes; the future: False when fenced."""
        ...

    async def images(self, content_request_id: str, attempt: int) -> list[tuple[int, Output]]: ...

    # -- instances ----------------------------------------------------------------------

    async def heartbeat(self, instance: str, now: float) -> None: ...

    async def adopt_stale(self, instance: str, now: float, stale_after: float) -> list[str]: ...

    # -- outbox -------------------------------------------------------------------------

    async def due_events(self, instance: str, now: float, limit: int) -> list[OutboxEvent]: ...

    async def next_due_at(self, instance: str, in_flight: tuple[str, ...] = ()) -> float | None: ...

    async def event_still_current(self, event_id: str) -> bool: ...

    async def record_delivery(
        self,
        event_id: str,
        state: str,
        attempts: int,
        now: float,
        next_attempt_at: float | None = None,
        last_error: str | None = None,
    ) -> None: ...

    async def drop_event(self, event_id: str, now: float) -> None: ...

    async def callback_summary(
        self, content_request_id: str, attempt: int
    ) -> CallbackSummary | None: ...

    async def redeliver_dead(
        self,
        instance: str,
        now: float,
        content_request_id: str | None = None,
        dead_since: float | None = None,
    ) -> list[OutboxEvent]:
        """Dead events (one id's latest, or all dead since a time) pending again, due now,
        under the same event id, for `instance` to send."""
        ...

    async def outbox_backlog(self) -> tuple[int, int]:
        """(pending, dead) events."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Fleet(Protocol):
    """What a store shared by several hosts adds (the Postgres store; not SQLite).

    A job admitted with no instance (`Job.instance == ""`, epoch 0) waits for a host; any
    host claims waiting jobs when its ComfyUI can start one. Hosts are told of new waiting
    jobs and of DELETEs for their jobs through `listen`.
    """

    async def claim(self, instance: str, limit: int) -> tuple[list[Job], int]:
        """Up to `limit` waiting jobs, oldest first, now `instance`'s under a new epoch;
        and how many still wait."""
        ...

    async def count_waiting(self) -> int: ...

    async def waiting_ahead(self, created_at: float) -> int:
        """Waiting jobs accepted before `created_at` (a waiting job's queue position)."""
        ...

    async def released(self, old_prompt_id: str, new_prompt_id: str, now: float) -> int | None:
        """A job of a dead or restarted run waits for any host again (a new prompt_id, its
        epoch raised, one more run counted); its epoch, None if it ended meanwhile."""
        ...

    async def live_hosts(self, now: float, within: float) -> int:
        """Hosts whose last heartbeat is at most `within` seconds old."""
        ...

    async def listen(self, notice: Callable[[str, str], None]) -> None:
        """Forever: `notice(kind, argument)` for "job" (a job waits; argument "") and
        "cancel" (argument: the host asked to cancel one of its jobs); "reconnected" when
        notices may have been missed. Reconnects by itself."""
        ...
