"""The jobs this process is running: the in-memory side of the journal.

The journal (the store) is the source of truth; a `Run` only holds what cannot be stored:
the upload tasks and the live progress of a job on this process's ComfyUI.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .jobs import Job, Output


@dataclass(slots=True)
class Run:
    """A job this process put on ComfyUI's queue and has not finished yet."""

    job: Job
    uses_node: bool
    uploads: list[asyncio.Future[Output]] = field(default_factory=list)
    next_seq: int = 1
    completed: bool = False
    progress: float | None = None  # of the running sampler, from ComfyUI's progress bars
    files: list[Path] = field(default_factory=list)  # what it wrote to ComfyUI's output folder
    # monotonic time its execution started, as the queue watch first saw it running: the
    # job timeout is measured from it (job.started_at is wall clock, kept in the store)
    started_mono: float | None = None


class Runs:
    """This process's unfinished jobs, by prompt_id; also the queue limit's count."""

    def __init__(self) -> None:
        self.by_prompt: dict[str, Run] = {}
        # admitted, and put on ComfyUI's queue once its 202 is written (Admission.put);
        # a dict for its order
        self.unqueued: dict[str, None] = {}
        self.admitting = 0  # requests between the queue-limit check and their insert
        self.done_seen: set[str] = set()  # written by ComfyUI's worker thread
        self.recent: deque[float] = deque(maxlen=20)  # start to end, s (Retry-After)
        # told when a run leaves execution or ends: a host sharing its store claims the next
        self.on_free: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self.by_prompt)

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self.by_prompt

    def get(self, prompt_id: str) -> Run | None:
        return self.by_prompt.get(prompt_id)

    def add(self, run: Run) -> None:
        self.by_prompt[run.job.prompt_id] = run

    def pop(self, prompt_id: str) -> Run | None:
        run = self.by_prompt.pop(prompt_id, None)
        if run is not None:
            self.freed()
        return run

    def freed(self) -> None:
        """A run left ComfyUI's execution (its uploads may go on) or ended."""
        if self.on_free is not None:
            self.on_free()

    def unqueued_position(self, prompt_id: str) -> int:
        return list(self.unqueued).index(prompt_id)

    def retry_after(self) -> int:
        """Seconds until a place under COURIER_MAX_QUEUE likely frees: one job's run (start
        to end, uploads included), the median of recent ones; 10 before any has ended."""
        if not self.recent:
            return 10
        return min(60, max(1, math.ceil(statistics.median(self.recent))))
