"""What a dead process left: resubmitted, its uploads resumed, or ended with one event.

Start-up, the heartbeat's adoption of silent instances and a lost journal answer each
start a recovery; one runs at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from . import intake
from .comfy_queue import ComfyQueue
from .delivery import Deliverer
from .errors import WorkflowRejected
from .fencing import Fencing
from .ids import uuid7
from .jobs import ErrorType, Job, JobState
from .runs import Run, Runs
from .settings import Settings
from .settle import Settler
from .store import Fleet, Store
from .tasks import Background
from .uploads import Uploader

log = logging.getLogger(__name__)

HEARTBEAT_MAX = 5.0  # s between heartbeats at most (COURIER_TAKEOVER_AFTER / 4 if less)
# Wall-clock time that passes between heartbeats differing this much from the monotonic
# time that passed is a step of the clock (NTP slews far slower: 0.5 ms/s at most).
CLOCK_STEP = 5.0


class Recovery:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        runs: Runs,
        queue: ComfyQueue,
        uploader: Uploader,
        settler: Settler,
        background: Background,
        instance: str,
        clock: Callable[[], float],
        deliverer: Deliverer | None,
        fencing: Fencing,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fencing = fencing
        self.settings = settings
        self.store = store
        self.runs = runs
        self.queue = queue
        self.uploader = uploader
        self.settler = settler
        self.background = background
        self.instance = instance
        self.clock = clock  # wall: heartbeats are compared across processes
        self.deliverer = deliverer
        self.monotonic = monotonic
        # one recovery at a time: none queues a job twice
        self._recovering = asyncio.Lock()
        self._last_beat: tuple[float, float] | None = None  # (wall, monotonic)
        self._adopt_after = -float("inf")  # monotonic: no adoption before (a clock step)
        self.beats = 0
        # a store shared by several hosts: runs that ended with their host wait for any host
        self.fleet: Fleet | None = None
        self.on_released: Callable[[], None] = lambda: None
        # when the heartbeat came back after failing: every host's was failing too (the
        # store was down), so none is taken over until they have had time to beat again
        self.store_back_at: float | None = None

    @property
    def heartbeat_interval(self) -> float:
        return min(HEARTBEAT_MAX, self.settings.takeover_after / 4)

    async def keep_alive(self) -> None:
        """Heartbeat this instance; stop runs another instance took over while this one
        was silent; adopt the work of instances that went silent."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            await self.beat()

    async def beat(self) -> None:
        """One heartbeat, the fencing check, and the adoption of silent instances' work."""
        # One instant for the whole beat: a clock step while the heartbeat is written must
        # not make the adoption below read the siblings' beats with the stepped clock.
        now = self.clock()
        self._notice_clock_step(now)
        try:
            await self.store.heartbeat(self.instance, now)
        except Exception as e:
            if self.store_back_at is None or self.store_back_at >= 0:
                log.error("[courier] heartbeat failed: %s", e)
            self.store_back_at = -1.0  # failing
            return
        if self.store_back_at is not None and self.store_back_at < 0:
            self.store_back_at = now
        self.beats += 1
        try:
            await self.fencing.check()
            if self._may_adopt(now) and await self.adopt_orphans(now):
                await self.recover()
        except Exception:
            log.exception("[courier] heartbeat failed")

    def _notice_clock_step(self, wall: float) -> None:
        """Pause adoption for COURIER_TAKEOVER_AFTER after a step of this host's wall clock.

        Heartbeats are wall-clock times compared between processes: no monotonic clock is
        shared by two processes or survives a reboot, so silence cannot be measured with
        one. What one can do is notice a step of the local clock: right after a step
        forward every sibling's last beat looks old by the step, until each has beaten
        again with the stepped clock (the instances of one journal share a host's clock).
        """
        mono = self.monotonic()
        last, self._last_beat = self._last_beat, (wall, mono)
        if last is None:
            return
        step = (wall - last[0]) - (mono - last[1])
        if abs(step) > CLOCK_STEP:
            pause = self.settings.takeover_after
            self._adopt_after = mono + pause
            log.warning(
                "[courier] the wall clock stepped %+.0f s; no adoption of silent instances "
                "for %.0f s while the others' heartbeats catch up",
                step,
                pause,
            )

    def _may_adopt(self, now: float) -> bool:
        back = self.store_back_at
        return back is None or (back >= 0 and now - back >= self.settings.takeover_after)

    async def adopt_orphans(self, now: float | None = None) -> list[str]:
        if self.monotonic() < self._adopt_after:
            return []
        adopted = await self.store.adopt_stale(
            self.instance, self.clock() if now is None else now, self.settings.takeover_after
        )
        for name in adopted:
            log.warning("[courier] adopted the unfinished work of silent instance %s", name)
        if adopted and self.deliverer is not None:
            self.deliverer.wake()
        return adopted

    async def recover(self) -> None:
        """Finish or resubmit what a previous process of this instance left unfinished.

        One at a time, since a job being resubmitted is not in `runs` under its old
        prompt_id.
        """
        async with self._recovering:
            for job in await self.store.unfinished(self.instance):
                if job.prompt_id in self.runs:
                    continue  # this process runs it
                try:
                    await self._recover(job)
                except Exception:
                    log.exception("[courier] could not recover id=%s", job.content_request_id)

    async def _recover(self, job: Job) -> None:
        workflow = json.loads(job.workflow)
        run = Run(job, intake.uses_courier_node(workflow), completed=True)
        if job.state is JobState.UPLOADING and await self._reclaim(run):
            self.runs.add(run)
            log.info(
                "[courier] recovered uploads id=%s attempt=%s", job.content_request_id, job.attempt
            )
            self.background.spawn(self.settler.finish_uploads(run))
            return
        if job.cancel_requested:  # never run again what was asked to stop
            await self._end(
                run,
                ErrorType.CANCELLED,
                "cancelled while running (DELETE request); ComfyUI stopped before the prompt ended",
            )
            return
        # COURIER_MAX_ATTEMPTS stops a job that takes ComfyUI down with it, not the backlog
        # behind it: a run counts only if the job was executing (or uploading what it made)
        # when its process died; a job that only waited is resubmitted however often.
        executing = job.state is not JobState.QUEUED
        if executing and job.runs >= self.settings.max_attempts:
            await self._end(
                run,
                ErrorType.LOST,
                f"ComfyUI stopped while this job was {job.state.value}, "
                f"{job.runs} time(s) (COURIER_MAX_ATTEMPTS={self.settings.max_attempts})",
            )
            return
        old_prompt_id = job.prompt_id
        job.prompt_id = str(uuid7())
        if self.fleet is not None:
            # any host may run it again: it waits at its old place in the fleet's line
            epoch = await self.fleet.released(old_prompt_id, job.prompt_id, self.clock())
            if epoch is not None:
                log.info(
                    "[courier] released id=%s attempt=%s to the fleet (run %s)",
                    job.content_request_id,
                    job.attempt,
                    job.runs + 1,
                )
                self.on_released()
            return
        try:
            prompt, outputs = await self.queue.validated_prompt(job, workflow)
        except WorkflowRejected as e:
            job.prompt_id = old_prompt_id
            await self._end(
                run,
                ErrorType.VALIDATION,
                f"resubmission after a restart failed validation: {e.message}",
            )
            return
        epoch = await self.store.resubmitted(
            old_prompt_id, job.prompt_id, self.clock(), count_run=executing
        )
        if epoch is None:
            return  # it ended while this recovery worked through its list
        job.epoch = epoch
        if executing:
            job.runs += 1
        job.state = JobState.QUEUED
        job.started_at = job.executed_at = None
        self.queue.enqueue(Run(job, run.uses_node), prompt, outputs)
        log.info(
            "[courier] resubmitted id=%s attempt=%s prompt=%s run=%s",
            job.content_request_id,
            job.attempt,
            job.prompt_id,
            job.runs,
        )

    async def _reclaim(self, run: Run) -> bool:
        """Resume a run's uploads here, under a new epoch; False to run it again instead."""
        job = run.job
        epoch = await self.store.reclaim(job.prompt_id, job.epoch)
        if epoch is None:
            return False
        job.epoch = epoch
        return await self.uploader.resume(run)

    async def _end(self, run: Run, error_type: ErrorType, message: str) -> None:
        self.runs.add(run)
        await self.settler.finish(run, error_type, message)
