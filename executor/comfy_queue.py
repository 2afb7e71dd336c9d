"""Putting jobs on ComfyUI's queue: the prompt as /prompt would run it, and where it waits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import intake
from .comfy_port import ComfyPort, QueueSnapshot
from .errors import WorkflowRejected
from .jobs import Job
from .runs import Run, Runs


class ComfyQueue:
    def __init__(self, comfy: ComfyPort, runs: Runs, clock: Callable[[], float]) -> None:
        self.comfy = comfy
        self.runs = runs
        self.clock = clock

    async def validated_prompt(
        self, job: Job, workflow: dict[str, Any]
    ) -> tuple[dict[str, Any], list[str]]:
        """The prompt ComfyUI will run for `job`, and its outputs; WorkflowRejected if not."""
        prompt = intake.prepare_prompt(workflow, job.content_request_id)
        prompt = self.comfy.apply_on_prompt_handlers(prompt)
        result = await self.comfy.validate(job.prompt_id, prompt)
        if not result.ok or result.node_errors:
            error = result.error or {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": "some output nodes are invalid; the workflow is not run partly",
                "extra_info": {},
            }
            raise WorkflowRejected(error, result.node_errors)
        return prompt, result.outputs

    def enqueue(self, run: Run, prompt: dict[str, Any], outputs: list[str]) -> None:
        """Register `run` and put it on ComfyUI's queue at once (recovery's resubmission)."""
        self.runs.add(run)
        self.put(run.job, prompt, outputs)

    def put(self, job: Job, prompt: dict[str, Any], outputs: list[str]) -> None:
        extra_data = {
            "client_id": self.comfy.client_id,
            "create_time": int(self.clock() * 1000),
            "courier": {"content_request_id": job.content_request_id, "attempt": job.attempt},
        }
        self.comfy.enqueue(job.prompt_id, prompt, extra_data, outputs)

    def position(self, prompt_id: str, snapshot: QueueSnapshot | None = None) -> int | None:
        """0 while running, n = jobs of ComfyUI's whole queue ahead of it, None if absent."""
        if prompt_id in self.runs.unqueued:
            return self.comfy.queue_length() + self.runs.unqueued_position(prompt_id)
        return (snapshot or self.comfy.queue_snapshot()).position(prompt_id)

    def next_position(self) -> int:
        """The place a job admitted now will have."""
        return self.comfy.queue_length() + len(self.runs.unqueued)
