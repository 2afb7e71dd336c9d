"""What ComfyUI's worker thread reports (a prompt starts, progresses, saves images, ends),
handed to the server loop. Nothing here blocks the worker: each hand-off is one
`call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .comfy_port import ComfyPort, Completion
from .images import EncodedImage
from .jobs import JobState
from .runs import Runs
from .settle import Settler
from .status_updates import StatusNotifier
from .tasks import Background
from .uploads import Uploader

log = logging.getLogger(__name__)


class WorkerEvents:
    def __init__(
        self,
        runs: Runs,
        settler: Settler,
        uploader: Uploader,
        background: Background,
        clock: Callable[[], float],
        status_updates: StatusNotifier | None,
    ) -> None:
        self.runs = runs
        self.settler = settler
        self.uploader = uploader
        self.background = background
        self.clock = clock
        self.status_updates = status_updates
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the courier starts

    def listen(self, comfy: ComfyPort, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        comfy.on_start(self.start_from_worker)
        comfy.on_progress(self.progress_from_worker)
        comfy.on_completion(self.completion_from_worker)

    def from_worker(self, callback: Callable[..., Any], *args: Any) -> None:
        """Hand `callback(*args)` from ComfyUI's worker thread to the loop.

        While ComfyUI exits the worker may finish a prompt after the loop has closed. The
        job is then left to the journal: the next start recovers it.
        """
        if self.loop is None:  # a UI run before the courier started: nothing to track
            log.debug("[courier] not started; %s dropped", getattr(callback, "__name__", callback))
            return
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed
            log.debug("[courier] loop closed; %s dropped", getattr(callback, "__name__", callback))

    # -- on the worker thread -----------------------------------------------------------

    def start_from_worker(self, prompt_id: str) -> None:
        """Called on the worker thread as it takes a courier item: the job's execution starts.

        The adapter calls these hooks for the courier's own queue items only, never for a
        prompt someone else queued under a job's prompt_id.
        """
        self.from_worker(self._on_start, prompt_id, self.clock())

    def progress_from_worker(self, prompt_id: str, fraction: float) -> None:
        """Called on the worker thread by ComfyUI's progress bars."""
        if prompt_id in self.runs:
            self.from_worker(self._on_progress, prompt_id, fraction)

    def completion_from_worker(self, completion: Completion) -> None:
        """Called on the worker thread just before ComfyUI's task_done: never block here."""
        self.runs.done_seen.add(completion.prompt_id)
        self.from_worker(self._on_completion, completion)

    # -- on the loop --------------------------------------------------------------------

    def _on_start(self, prompt_id: str, started_at: float) -> None:
        run = self.runs.get(prompt_id)
        if run is not None and run.job.state is JobState.QUEUED:
            self.background.spawn(self.settler.mark_running(run, started_at))

    def _on_progress(self, prompt_id: str, fraction: float) -> None:
        run = self.runs.get(prompt_id)
        if run is None or run.completed:
            return
        run.progress = fraction
        if self.status_updates is not None:
            self.status_updates.update(run.job, "running", fraction)

    def _on_completion(self, completion: Completion) -> None:
        run = self.runs.get(completion.prompt_id)
        if run is None or run.completed:
            self.runs.done_seen.discard(completion.prompt_id)
            return
        run.completed = True
        self.runs.freed()  # first: a host sharing its store claims the next job at once
        self.background.spawn(self.settler.complete(run, completion))

    def images_saved(
        self,
        prompt_id: str,
        node_id: str,
        content_request_id: str,
        images: list[tuple[EncodedImage, Path]],
        courier_item: bool,
    ) -> None:
        """The node saved images (runs on the loop; the node reached it via from_worker).

        `courier_item`: the prompt is a queue item the courier put. Only then do the images
        belong to the job with that prompt_id: anyone can queue a prompt under a job's id
        through ComfyUI's /prompt, and that prompt is an ordinary one.
        Registering synchronously keeps the order with the completion that follows.
        """
        run = self.runs.get(prompt_id) if courier_item else None
        if run is None:
            if content_request_id:
                log.warning(
                    "[courier] images of prompt %s belong to no running courier job "
                    "(it ended, or the prompt was queued by someone else); not sent",
                    prompt_id,
                )
                return
            self.background.spawn(self.uploader.ui_run(prompt_id, node_id, images))
            return
        if run.job.state is JobState.QUEUED:
            self.background.spawn(self.settler.mark_running(run))
        for index, (image, path) in enumerate(images):
            self.uploader.start(run, node_id, index, image.data, image, path)
