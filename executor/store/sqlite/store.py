"""The SQLite journal as a `Store`: each method is one `Journal` call on the runner.

The runner (a child process by default, a thread as the fallback) runs calls one at a
time in the order they were made, which gives the store's ordering guarantee. Admissions
go through a group commit: a burst of requests costs one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from ...errors import StoreError
from ...jobs import CallbackSummary, Job, JobState, Output
from ..base import OutboxEvent
from ..group_commit import GroupCommit
from .journal import Journal
from .runner import JournalRunner

log = logging.getLogger(__name__)

R = TypeVar("R")
T = TypeVar("T")


class SqliteStore:
    def __init__(self, runner: JournalRunner, path: Path | str | None = None) -> None:
        self.runner = runner
        self.path = path
        self._admit: GroupCommit[Job, Job | int] = GroupCommit(self._send, Journal.admit)
        self.on_failure: Callable[[], None] | None = None
        self._instance_lock: IO[str] | None = None

    def _send(
        self, many: Callable[..., list[Job | int]], jobs: list[Job]
    ) -> asyncio.Future[list[Job | int]]:
        """The runner's `submit`: the call leaves at once (looked up each time, so a
        diagnostic that wraps the runner's method sees it)."""
        return self.runner.submit(many, jobs)

    def claim_instance(self, name: str) -> bool:
        """Hold `name` for this process's life; False if a live process holds it already.

        A file lock, which the kernel releases when its holder dies however it dies: it
        tells a live twin (a shared COURIER_INSTANCE, containers with equal hostname and
        port) from a dead predecessor, whose work this process must recover. Every
        process sharing a SQLite journal is on its host, so the lock is seen by all.
        """
        if fcntl is None or self.path is None or str(self.path) == ":memory:":
            return True  # Windows: no twin detection
        folder = Path(self.path).parent / "instances"
        folder.mkdir(parents=True, exist_ok=True)
        handle = (folder / f"{quote(name, safe='')}.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        if self._instance_lock is not None:
            self._instance_lock.close()
        self._instance_lock = handle
        return True

    @property
    def kind(self) -> str:
        return self.runner.kind

    @property
    def on_lost(self) -> Callable[[], None] | None:
        return getattr(self.runner, "on_lost", None)

    @on_lost.setter
    def on_lost(self, callback: Callable[[], None] | None) -> None:
        if hasattr(self.runner, "on_lost"):  # only a child process can be lost mid-call
            self.runner.on_lost = callback

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await self.runner(fn, *args, **kwargs)
        except sqlite3.Error as e:
            self._failed()
            raise StoreError(f"journal: {e}") from e

    def _failed(self, future: asyncio.Future[Any] | None = None) -> None:
        """Tell `on_failure` (for a future: once it ended with a journal error)."""
        if future is not None:
            if future.cancelled() or not isinstance(future.exception(), sqlite3.Error):
                return
        if self.on_failure is not None:
            try:
                self.on_failure()
            except Exception:
                log.exception("[courier] on_failure hook failed")

    # -- jobs ---------------------------------------------------------------------------

    async def admit(
        self, job: Job, then: Callable[[Job | int], R], after: Callable[[R], None]
    ) -> R:
        try:
            return await self._admit(job, then, after)
        except sqlite3.Error as e:
            self._failed()
            raise StoreError(f"journal: {e}") from e

    async def latest(self, content_request_id: str) -> Job | None:
        return await self._call(Journal.latest, content_request_id)

    async def count_unfinished(self) -> int:
        return await self._call(Journal.count_unfinished)

    async def unfinished(self, instance: str) -> list[Job]:
        return await self._call(Journal.unfinished, instance)

    async def set_state(
        self, prompt_id: str, state: JobState, *, epoch: int | None = None, **fields: Any
    ) -> bool:
        return await self._call(Journal.set_state, prompt_id, state, epoch=epoch, **fields)

    async def request_cancel(self, content_request_id: str, attempt: int) -> bool:
        return await self._call(Journal.request_cancel, content_request_id, attempt)

    async def cancel_requests(self, instance: str) -> list[str]:
        return await self._call(Journal.cancel_requests, instance)

    async def resubmitted(
        self, old_prompt_id: str, new_prompt_id: str, now: float, *, count_run: bool
    ) -> int | None:
        return await self._call(Journal.resubmitted, old_prompt_id, new_prompt_id, now, count_run)

    async def reclaim(self, prompt_id: str, epoch: int) -> int | None:
        return await self._call(Journal.reclaim, prompt_id, epoch)

    async def fenced(self, instance: str, runs: list[tuple[str, int]]) -> list[str]:
        return await self._call(Journal.fenced, instance, runs)

    async def finish(self, job: Job, event: OutboxEvent | None) -> bool:
        return await self._call(Journal.finish, job, event)

    async def prune(self, finished_before: float, limit: int) -> int:
        return await self._call(Journal.prune, finished_before, limit)

    # -- images -------------------------------------------------------------------------

    def record_image(self, job: Job, seq: int, output: Output) -> asyncio.Future[bool]:
        future = self.runner.submit(Journal.record_image, job, seq, output)
        future.add_done_callback(self._failed)
        return future

    async def images(self, content_request_id: str, attempt: int) -> list[tuple[int, Output]]:
        return await self._call(Journal.images, content_request_id, attempt)

    # -- instances ----------------------------------------------------------------------

    async def heartbeat(self, instance: str, now: float) -> None:
        await self._call(Journal.heartbeat, instance, now)

    async def adopt_stale(self, instance: str, now: float, stale_after: float) -> list[str]:
        return await self._call(Journal.adopt_stale, instance, now, stale_after)

    # -- outbox -------------------------------------------------------------------------

    async def due_events(self, instance: str, now: float, limit: int) -> list[OutboxEvent]:
        return await self._call(Journal.due_events, instance, now, limit)

    async def next_due_at(self, instance: str, in_flight: tuple[str, ...] = ()) -> float | None:
        return await self._call(Journal.next_due_at, instance, in_flight)

    async def event_still_current(self, event_id: str) -> bool:
        return await self._call(Journal.event_still_current, event_id)

    async def record_delivery(
        self,
        event_id: str,
        state: str,
        attempts: int,
        now: float,
        next_attempt_at: float | None = None,
        last_error: str | None = None,
    ) -> None:
        await self._call(
            Journal.record_delivery, event_id, state, attempts, now, next_attempt_at, last_error
        )

    async def drop_event(self, event_id: str, now: float) -> None:
        await self._call(Journal.drop_event, event_id, now)

    async def callback_summary(
        self, content_request_id: str, attempt: int
    ) -> CallbackSummary | None:
        return await self._call(Journal.callback_summary, content_request_id, attempt)

    async def redeliver_dead(
        self,
        instance: str,
        now: float,
        content_request_id: str | None = None,
        dead_since: float | None = None,
    ) -> list[OutboxEvent]:
        return await self._call(
            Journal.redeliver_dead, instance, now, content_request_id, dead_since
        )

    async def outbox_backlog(self) -> tuple[int, int]:
        return await self._call(Journal.outbox_backlog)

    async def outbox_counts(self) -> dict[str, int]:
        """Events per state; scans the whole outbox (tests and diagnostics)."""
        return await self._call(Journal.outbox_counts)

    def release_instance(self) -> None:
        if self._instance_lock is not None:
            self._instance_lock.close()
            self._instance_lock = None

    async def aclose(self) -> None:
        await self.runner.aclose()
        self.release_instance()
