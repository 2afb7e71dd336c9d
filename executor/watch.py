"""The queue watch: jobs that started, ran too long, vanished from ComfyUI's queue, or
whose worker thread died; and the DELETEs that reached a sibling instance."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .cancellation import Cancellation
from .comfy_port import ComfyPort
from .jobs import ErrorType, JobState
from .runs import Run, Runs
from .settings import Settings
from .settle import Settler

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.5
# How much of a run's wall-clock age, when the watch first sees it running, counts toward
# its timeout: the watch looks every 0.5 s, so a run it has not seen yet started moments
# ago (later if the loop was blocked). Bounded, so a wall-clock step in that moment
# cannot time a job out.
FIRST_SIGHT_SLACK = 10.0
CANCEL_POLL_TICKS = 4  # DELETEs that reached a sibling instance are read every 2 s


class QueueWatch:
    def __init__(
        self,
        settings: Settings,
        comfy: ComfyPort,
        runs: Runs,
        settler: Settler,
        cancellation: Cancellation,
        clock: Callable[[], float],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.comfy = comfy
        self.runs = runs
        self.settler = settler
        self.cancellation = cancellation
        self.clock = clock  # wall: job.started_at as the store keeps it
        self.monotonic = monotonic  # the timeout: a duration in this process

    async def run(self) -> None:
        ticks = 0
        while True:
            ticks += 1
            try:
                await self.once()
                if self.runs.by_prompt and ticks % CANCEL_POLL_TICKS == 0:
                    await self.cancellation.apply_requests()
            except Exception:
                log.exception("[courier] queue watch failed")
            await asyncio.sleep(WATCH_INTERVAL)

    async def once(self) -> None:
        """Notice jobs that started, ran too long, or vanished from ComfyUI's queue."""
        runs = self.runs
        if not runs.by_prompt:
            return
        if self.comfy.worker_alive() is False:
            await self._worker_died()
            return
        snapshot = self.comfy.queue_snapshot()
        # Set operations, not a loop over every job: a long queue costs the loop little.
        # Both lists are taken before the first await, so no job queued later is in them.
        running = [p for p in snapshot.running if p in runs]
        vanished = (
            runs.by_prompt.keys()
            - snapshot.pending.keys()
            - snapshot.running
            - runs.unqueued.keys()
        )
        for prompt_id in running:
            run = runs.get(prompt_id)
            if run is None or run.completed or prompt_id in runs.done_seen:
                continue
            job = run.job
            if job.state is JobState.QUEUED:
                await self.settler.mark_running(run)
            if job.cancel_requested:
                # ComfyUI clears its interrupt flag when a prompt starts: a DELETE that
                # landed just before would be lost without asking again.
                self.comfy.interrupt(prompt_id)
            if self._running_for(run) > self.settings.job_timeout:
                self.comfy.interrupt(prompt_id)
                run.completed = True
                await self.settler.finish(
                    run,
                    ErrorType.TIMEOUT,
                    f"ran longer than {self.settings.job_timeout:g} s "
                    "(COURIER_JOB_TIMEOUT); interrupted",
                )
        for prompt_id in vanished:
            run = runs.get(prompt_id)
            if run is None or run.completed or prompt_id in runs.done_seen:
                continue  # ended meanwhile, or its completion is on its way
            run.completed = True
            await self.settler.finish(
                run, ErrorType.CANCELLED, "removed from ComfyUI's queue before it ran"
            )

    def _running_for(self, run: Run) -> float:
        """Seconds since `run` started executing, by the monotonic clock: a step of the
        wall clock neither times it out nor extends it."""
        mono = self.monotonic()
        if run.started_mono is None:
            started_at = run.job.started_at
            age = 0.0 if started_at is None else self.clock() - started_at
            run.started_mono = mono - min(max(age, 0.0), FIRST_SIGHT_SLACK)
        return mono - run.started_mono

    async def _worker_died(self) -> None:
        """ComfyUI's prompt worker thread is gone: nothing queued will ever run."""
        log.critical("[courier] ComfyUI's prompt worker thread died; restart ComfyUI")
        for run in list(self.runs.by_prompt.values()):
            if not run.completed and run.job.state in (JobState.QUEUED, JobState.RUNNING):
                await self.settler.finish(
                    run,
                    ErrorType.LOST,
                    "ComfyUI's prompt worker stopped (see its log); restart ComfyUI and retry",
                )
