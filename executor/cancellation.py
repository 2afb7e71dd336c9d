"""DELETE /execute-workflow/{id}: off ComfyUI's queue, or interrupted while it runs.

A job of another instance sharing the store is flagged there; that instance acts on the
flag (`apply_requests`): told at once by the store's notice where it has them (Postgres),
else on its watch's next poll. A job still waiting for a host is ended at once, anywhere.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from . import intake
from .comfy_port import ComfyPort
from .errors import Conflict, NotFound
from .jobs import ErrorType, Job, JobState
from .keyed_lock import KeyedLock
from .runs import Run, Runs
from .settle import Settler
from .status import StatusReader
from .store import Store

log = logging.getLogger(__name__)


class Cancellation:
    def __init__(
        self,
        store: Store,
        runs: Runs,
        comfy: ComfyPort,
        settler: Settler,
        status: StatusReader,
        id_locks: KeyedLock,
        instance: str,
    ) -> None:
        self.store = store
        self.runs = runs
        self.comfy = comfy
        self.settler = settler
        self.status = status
        self.id_locks = id_locks
        self.instance = instance

    async def __call__(self, content_request_id: str) -> dict[str, Any]:
        async with self.id_locks(content_request_id):
            job = await self.store.latest(content_request_id)
            if job is None:
                raise NotFound(f"no job with content_request_id {content_request_id!r}")
            run = self.runs.get(job.prompt_id)
            cancellable = job.state in (JobState.QUEUED, JobState.RUNNING)
            if cancellable and run is None and not job.instance:
                if await self._cancel_waiting(job):
                    return await self.status(content_request_id)
                # a host claimed it meanwhile: ask that host
                job = await self.store.latest(content_request_id) or job
                run = self.runs.get(job.prompt_id)
                cancellable = job.state in (JobState.QUEUED, JobState.RUNNING)
            if cancellable and run is None and job.instance != self.instance:
                await self._cancel_elsewhere(job)
                return await self.status(content_request_id)
            if not cancellable or run is None or run.completed:
                raise Conflict(
                    f"job {content_request_id!r} has finished executing ({job.state.value}); "
                    "nothing to cancel",
                    state=job.state.value,
                )
            await self.cancel_run(run)
            return await self.status(content_request_id)

    async def cancel_run(self, run: Run) -> None:
        """Take a job of this process off the queue, or interrupt it while it runs."""
        job = run.job
        if job.prompt_id in self.runs.unqueued or self.comfy.remove_pending(job.prompt_id):
            run.completed = True
            await self.settler.finish(
                run, ErrorType.CANCELLED, "cancelled before it ran (DELETE request)"
            )
            return
        job.cancel_requested = True
        await self.store.set_state(job.prompt_id, job.state, epoch=job.epoch, cancel_requested=1)
        if not self.comfy.interrupt(job.prompt_id):
            log.warning(
                "[courier] cancel id=%s: prompt not running, waiting", job.content_request_id
            )

    async def _cancel_waiting(self, job: Job) -> bool:
        """A job waiting for a host (a shared store): ended here with its one event; False
        if a host claimed it first (its claim raised the epoch this write carries)."""
        workflow = json.loads(job.workflow)
        job.instance = self.instance  # its event is sent from here
        run = Run(job, intake.uses_courier_node(workflow), completed=True)
        return await self.settler.finish(
            run, ErrorType.CANCELLED, "cancelled before it ran (DELETE request)"
        )

    async def _cancel_elsewhere(self, job: Job) -> None:
        """A job of another ComfyUI sharing this journal (one per GPU behind one address).

        The request goes through the journal; that instance's queue watch acts on it.
        """
        if not await self.store.request_cancel(job.content_request_id, job.attempt):
            raise Conflict(
                f"job {job.content_request_id!r} has finished executing; nothing to cancel",
                state=job.state.value,
            )
        log.info(
            "[courier] cancel id=%s: asked instance %s through the journal",
            job.content_request_id,
            job.instance,
        )

    async def apply_requests(self) -> None:
        """Cancel the jobs of this process that a sibling instance was asked to cancel."""
        for prompt_id in await self.store.cancel_requests(self.instance):
            run = self.runs.get(prompt_id)
            if run is None or run.completed or run.job.cancel_requested:
                continue
            if run.job.state in (JobState.QUEUED, JobState.RUNNING):  # not once it uploads
                await self.cancel_run(run)
