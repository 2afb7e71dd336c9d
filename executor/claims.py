"""Claims: on a store shared by several hosts, work goes to whichever ComfyUI can start it.

A host keeps at most CLAIM_DEPTH courier jobs queued or running on its ComfyUI (one: the
next job is claimed the moment the current one leaves execution, so none waits behind a
busy GPU while another host's is idle). An accepted job that this host cannot start now is
committed as waiting; every host's claimer takes waiting jobs, oldest first, whenever it
has room: woken by the store's notices ("a job waits"), by its own jobs leaving
execution, and by a slow poll in case a notice was lost.

A claimed job is validated again against this host's ComfyUI (hosts are meant to have the
same nodes and models); one that fails ends with a `validation` error naming the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

from . import intake
from .comfy_queue import ComfyQueue
from .errors import WorkflowRejected
from .jobs import ErrorType, Job
from .metrics import Metrics
from .runs import Run, Runs
from .settle import Settler
from .store import Fleet

log = logging.getLogger(__name__)

CLAIM_DEPTH = 1  # courier jobs queued or running on this ComfyUI before it claims no more
POLL_INTERVAL = 5.0  # s between claims when no notice came (a lost notice, a missed wake)
COUNT_INTERVAL = 0.2  # s: a busy host refreshes the fleet's waiting count at most this often


class Claimer:
    def __init__(
        self,
        store: Fleet,
        runs: Runs,
        queue: ComfyQueue,
        settler: Settler,
        instance: str,
        clock: Callable[[], float],
        metrics: Metrics,
        on_poll: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.runs = runs
        self.queue = queue
        self.settler = settler
        self.instance = instance
        self.clock = clock
        self.metrics = metrics
        self.on_poll = on_poll  # each slow poll (the deliverer looks for orphaned events)
        self.reserved = 0  # admissions claiming their job in their own transaction
        self.waiting = 0  # the fleet's waiting jobs, as last read (for the queue limit)
        self._counted_at = 0.0
        self._woken = False  # woken while claiming: claim again before waiting
        self._force = False  # claim even if the line looked empty (poll, reconnection)
        self._waiter: asyncio.Future[bool] | None = None
        self._counting: asyncio.Future[None] | None = None

    # -- room on this host ----------------------------------------------------------------

    def busy(self) -> int:
        """Courier jobs on this ComfyUI that have not left execution (uploads don't count);
        full when its worker thread is dead: nothing queued here would ever run."""
        if self.queue.comfy.worker_alive() is False:
            return CLAIM_DEPTH
        return self.reserved + sum(1 for run in self.runs.by_prompt.values() if not run.completed)

    def reserve(self) -> bool:
        """Room for an admission to take its job here at once (released by `unreserve`)."""
        if self.busy() >= CLAIM_DEPTH:
            return False
        self.reserved += 1
        return True

    def unreserve(self) -> None:
        self.reserved -= 1
        self.wake()  # the admission may have ended without a job

    def wake(self) -> None:
        """Claim as soon as the loop can: the claimer awaits a bare future, so it runs at
        the loop's next pass (an Event would take several)."""
        self._woken = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(False)

    def _poll(self) -> None:
        self._force = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    def notice(self, kind: str, argument: str) -> None:
        """The store's notices: a job waits, or the listener reconnected (notices lost)."""
        if kind == "job":
            self.waiting += 1  # at least one more; the claim or the next count says how many
            self.wake()
        elif kind == "reconnected":
            self._force = True
            self.wake()

    # -- claiming -------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            polled = False
            if not self._woken:
                self._waiter = loop.create_future()
                timer = loop.call_later(POLL_INTERVAL, self._poll)
                try:
                    polled = await self._waiter
                finally:
                    timer.cancel()
                    self._waiter = None
            self._woken = False
            if polled:
                self.on_poll()
            try:
                await self.once()
            except Exception:
                log.exception("[courier] claiming waiting jobs failed")
                await asyncio.sleep(1.0)

    async def once(self) -> int:
        """Claim waiting jobs while this host has room; how many it took.

        Only when some may wait: a job of this host that ends says nothing about the
        fleet's line, so it costs no query when the line was empty at the last look (a
        notice or the poll says otherwise)."""
        force, self._force = self._force, False
        if not force and self.waiting <= 0:
            return 0
        took = 0
        while (room := CLAIM_DEPTH - self.busy()) > 0:
            jobs, self.waiting = await self.store.claim(self.instance, room)
            self._counted_at = self.clock()
            runs = [self._register(job) for job in jobs]  # all at once: none looks orphaned
            for run in runs:
                await self._start(run)
            took += len(jobs)
            if len(jobs) < room:
                break
        if not took and (self._counting is None or self._counting.done()):
            self._counting = asyncio.ensure_future(self._count())
        return took

    async def _count(self) -> None:
        """Refresh the fleet's waiting count for the queue limit, at most every
        COUNT_INTERVAL: a busy host hears of every job that starts waiting."""
        await asyncio.sleep(max(0.0, self._counted_at + COUNT_INTERVAL - self.clock()))
        self._counted_at = self.clock()
        try:
            self.waiting = await self.store.count_waiting()
        except Exception as e:
            log.warning("[courier] could not count the fleet's waiting jobs: %s", e)

    def _register(self, job: Job) -> Run:
        run = Run(job, intake.uses_courier_node(json.loads(job.workflow)))
        self.runs.add(run)
        self.runs.unqueued[job.prompt_id] = None  # not on ComfyUI's queue yet: not vanished
        self.metrics.jobs_claimed.inc()
        return run

    async def _start(self, run: Run) -> None:
        """Validate a claimed job here, then put it on this ComfyUI's queue."""
        job = run.job
        if run.completed:  # cancelled meanwhile
            self.runs.unqueued.pop(job.prompt_id, None)
            return
        if job.cancel_requested:  # a DELETE reached it while it waited
            self.runs.unqueued.pop(job.prompt_id, None)
            run.completed = True
            await self.settler.finish(
                run, ErrorType.CANCELLED, "cancelled before it ran (DELETE request)"
            )
            return
        try:
            prompt, outputs = await self.queue.validated_prompt(job, json.loads(job.workflow))
        except WorkflowRejected as e:
            self.runs.unqueued.pop(job.prompt_id, None)
            run.completed = True
            await self.settler.finish(
                run,
                ErrorType.VALIDATION,
                f"failed validation on host {self.instance}: {e.message}",
            )
            return
        self.runs.unqueued.pop(job.prompt_id, None)
        if run.completed:
            return  # cancelled while it was validated
        try:
            self.queue.put(job, prompt, outputs)
        except Exception as e:  # as in Admission.put: take it back, end it once
            log.exception("[courier] ComfyUI did not queue id=%s", job.content_request_id)
            with contextlib.suppress(Exception):
                self.queue.comfy.remove_pending(job.prompt_id)
            if job.prompt_id in self.queue.comfy.queue_snapshot():
                return
            run.completed = True
            await self.settler.finish(run, ErrorType.LOST, f"ComfyUI did not queue it: {e}")
            return
        log.debug(
            "[courier] claimed id=%s attempt=%s prompt=%s epoch=%s",
            job.content_request_id,
            job.attempt,
            job.prompt_id,
            job.epoch,
        )
