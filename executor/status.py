"""The status body of a job, as GET /execute-workflow/{id} and a duplicate POST answer it."""

from __future__ import annotations

from typing import Any

from .comfy_port import QueueSnapshot
from .comfy_queue import ComfyQueue
from .errors import NotFound
from .jobs import CallbackSummary, Job, JobState, status_body
from .runs import Runs
from .settings import Settings
from .store import Fleet, Store


class StatusReader:
    def __init__(self, settings: Settings, store: Store, runs: Runs, queue: ComfyQueue) -> None:
        self.settings = settings
        self.store = store
        self.runs = runs
        self.queue = queue
        self.fleet: Fleet | None = None  # a store shared by several hosts

    async def __call__(self, content_request_id: str) -> dict[str, Any]:
        job = await self.store.latest(content_request_id)
        if job is None:
            raise NotFound(f"no job with content_request_id {content_request_id!r}")
        return await self.of(job)

    async def of(self, job: Job, snapshot: QueueSnapshot | None = None) -> dict[str, Any]:
        summary = await self.store.callback_summary(job.content_request_id, job.attempt)
        if summary is None:
            summary = CallbackSummary("pending" if self.will_call_back(job) else "none")
        position = progress = None
        if not job.final:
            position = self.queue.position(job.prompt_id, snapshot)
            if self.fleet is not None and not job.instance and job.state is JobState.QUEUED:
                position = await self.fleet.waiting_ahead(job.created_at)  # the fleet's line
            run = self.runs.get(job.prompt_id)
            progress = run.progress if run is not None else None
            if progress is None and job.state is JobState.QUEUED:
                progress = 0.0
        return status_body(job, summary, position, progress)

    def will_call_back(self, job: Job) -> bool:
        return self.settings.callback_url is not None and not job.final
