"""Runs another process has taken over: stopped here, never written.

A stalled instance (SIGSTOP, a paused container, a blocked loop) whose heartbeat goes
silent for COURIER_TAKEOVER_AFTER has its jobs adopted and run again by a sibling, under
a higher epoch. When the stalled one wakes, the store refuses every write of its old
runs; this module stops those runs in ComfyUI and forgets them, so nothing of theirs is
delivered (their late uploads went to keys of their own epoch).
"""

from __future__ import annotations

import logging

from .comfy_port import ComfyPort
from .runs import Runs
from .status_updates import StatusNotifier
from .store import Store

log = logging.getLogger(__name__)


class Fencing:
    def __init__(
        self,
        store: Store,
        runs: Runs,
        comfy: ComfyPort,
        instance: str,
        status_updates: StatusNotifier | None,
    ) -> None:
        self.store = store
        self.runs = runs
        self.comfy = comfy
        self.instance = instance
        self.status_updates = status_updates

    async def check(self) -> None:
        """Stop the runs of this process that the store says are no longer its own."""
        held = [
            (prompt_id, run.job.epoch)
            for prompt_id, run in self.runs.by_prompt.items()
            if prompt_id not in self.runs.unqueued and not run.completed
        ]
        if held:
            for prompt_id in await self.store.fenced(self.instance, held):
                self.stop(prompt_id, "another instance took it over")

    def stop(self, prompt_id: str, why: str) -> None:
        run = self.runs.pop(prompt_id)
        if run is None:
            return
        run.completed = True
        job = run.job
        if not self.comfy.remove_pending(prompt_id):
            self.comfy.interrupt(prompt_id)
        if self.status_updates is not None:
            self.status_updates.close(job)  # nothing more from this run
        log.warning(
            "[courier] fenced id=%s attempt=%s epoch=%s prompt=%s: %s; stopped here, "
            "nothing of this run is delivered",
            job.content_request_id,
            job.attempt,
            job.epoch,
            prompt_id,
            why,
        )
