"""How a job ends: its outcome from ComfyUI's report and its uploads, then one final event.

`finish` is the only way a job becomes final: one commit of the final state with its
outbox event, then the log line, the metrics and the first delivery attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import replace

from .comfy_port import Completion
from .delivery import Deliverer
from .errors import StorageError, StoreError
from .fencing import Fencing
from .ids import uuid7
from .jobs import ErrorType, Job, JobState, Output, callback_body
from .metrics import Metrics
from .runs import Run, Runs
from .settings import Settings
from .status_updates import StatusNotifier
from .store import OutboxEvent, Store
from .tasks import Background
from .uploads import Uploader

log = logging.getLogger(__name__)

JOURNAL_RETRY = (0.1, 0.5, 2.0, 5.0)  # waits between the first tries of a final-state write
STUCK_RETRY_MAX = 10.0  # then a try at least this often, for as long as the process lives


class Settler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        runs: Runs,
        uploader: Uploader,
        clock: Callable[[], float],
        metrics: Metrics,
        deliverer: Deliverer | None,
        status_updates: StatusNotifier | None,
        background: Background,
        fencing: Fencing,
    ) -> None:
        self.background = background
        self.fencing = fencing
        self.settings = settings
        self.store = store
        self.runs = runs
        self.uploader = uploader
        self.clock = clock
        self.metrics = metrics
        self.deliverer = deliverer
        self.status_updates = status_updates

    async def mark_running(self, run: Run, started_at: float | None = None) -> None:
        job = run.job
        if job.state is not JobState.QUEUED:
            return
        job.state = JobState.RUNNING
        job.started_at = started_at or self.clock()
        if self.status_updates is not None:
            self.status_updates.update(job, "running", 0.0)
        if not await self.store.set_state(
            job.prompt_id, JobState.RUNNING, epoch=job.epoch, started_at=job.started_at
        ):
            self.fencing.stop(job.prompt_id, "the store refused its start")
            return
        log.debug("[courier] running id=%s prompt=%s", job.content_request_id, job.prompt_id)

    # -- ComfyUI reported the prompt's end ----------------------------------------------

    async def complete(self, run: Run, completion: Completion) -> None:
        job = run.job
        job.executed_at = self.clock()
        if job.started_at is None:
            job.started_at = job.executed_at
        try:
            await self._settle(run, completion)
        except Exception as e:  # whatever else breaks, the job still ends with one callback
            log.exception("[courier] finishing id=%s failed", job.content_request_id)
            await self.finish(run, ErrorType.EXECUTION, f"comfy-courier failed: {e!r}"[:500])
        finally:
            self.runs.done_seen.discard(completion.prompt_id)

    async def _settle(self, run: Run, completion: Completion) -> None:
        job = run.job
        failed = (
            completion.status_str != "success"
            if not completion.messages
            else any(
                event in ("execution_error", "execution_interrupted")
                for event, _ in completion.messages
            )
        )  # messages, not status_str: ComfyUI's success flag can carry over between prompts
        if failed:
            error_type, message, node_id = _failure(run, completion)
            await self.finish(run, error_type, message, node_id)
            return
        if not run.uses_node:
            await self.uploader.collect_saved_files(run, completion)
        if any(not upload.done() for upload in run.uploads):
            if not await self._mark_uploading(run):
                return
        # else nothing is left to upload: the end is written at once, and a crash before
        # it would find nothing to resume, so no "uploading" mark (one write less: with
        # the database far away, one round trip less before the callback)
        job.state = JobState.UPLOADING
        log.debug(
            "[courier] uploading id=%s prompt=%s images=%d",
            job.content_request_id,
            job.prompt_id,
            len(run.uploads),
        )
        await self.finish_uploads(run)

    async def _mark_uploading(self, run: Run) -> bool:
        """Record that the run's uploads are under way (crash recovery resumes them);
        False when the store refused it: the run was taken over."""
        job = run.job
        try:
            if not await self.store.set_state(
                job.prompt_id,
                JobState.UPLOADING,
                epoch=job.epoch,
                executed_at=job.executed_at,
                started_at=job.started_at,
                expected_images=len(run.uploads),
            ):
                self.fencing.stop(job.prompt_id, "the store refused its end")
                return False
        except StoreError as e:
            # Only crash recovery reads it (to resume uploads): without it a crash re-runs
            # the prompt instead. The uploads and the final write go on.
            log.error(
                "[courier] could not record id=%s as uploading (%s); going on",
                job.content_request_id,
                e,
            )
        return True

    async def finish_uploads(self, run: Run) -> None:
        results = await asyncio.gather(*run.uploads, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            first = failures[0]
            message = first.message if isinstance(first, StorageError) else repr(first)
            await self.finish(run, ErrorType.UPLOAD, f"image upload failed: {message}")
            return
        outputs = [r for r in results if isinstance(r, Output)]
        if not outputs:
            await self.finish(
                run,
                ErrorType.EXECUTION,
                "the workflow finished without producing an image "
                "(add a SaveAndCallback or SaveImage node)",
            )
            return
        await self.finish(run, None, None, outputs=outputs)

    # -- the final event ----------------------------------------------------------------

    async def finish(
        self,
        run: Run,
        error_type: ErrorType | None,
        message: str | None,
        node_id: str | None = None,
        outputs: list[Output] | None = None,
    ) -> bool:
        """Commit the final state and its callback event, once. False if already final.

        The store gets a snapshot; the live job changes only once the commit is done. A
        store that keeps failing is tried again in the background for as long as this
        process lives (the callback follows within seconds of the store coming back); the
        job is never reported with a made-up outcome.
        """
        run.completed = True
        if message is not None:  # whatever made it, it leaves the host: no host folders
            message = self.uploader.comfy.relative_paths(message)
        ordered = sorted(outputs or [], key=lambda o: (_node_order(o.node_id), o.index))
        final = replace(
            run.job,
            state=JobState.SUCCESS if error_type is None else JobState.ERROR,
            error_type=error_type,
            error_message=message,
            node_id=node_id,
            outputs=tuple(ordered),
            image_urls=tuple(o.url for o in ordered if o.url),
            finished_at=self.clock(),
        )
        event = None
        if self.settings.callback_url is not None:
            body = json.dumps(callback_body(final), separators=(",", ":")).encode()
            event = OutboxEvent(
                f"msg_{uuid7().hex}",
                final.content_request_id,
                final.attempt,
                body,
                0,
                final.finished_at or 0.0,
            )
        if self.status_updates is not None:
            self.status_updates.close(final)  # nothing intermediate after the final event
        for delay in (*JOURNAL_RETRY, None):
            try:
                return self._finished(run, final, event, await self.store.finish(final, event))
            except StoreError as e:
                if delay is None:
                    # Never given up while this process lives: the run keeps its place
                    # under COURIER_MAX_QUEUE until its end is written.
                    self.background.spawn(self._finish_when_writable(run, final, event, e))
                    return False
                log.error("[courier] journal write failed (%s); retrying in %.1f s", e, delay)
                await asyncio.sleep(delay)
        return False

    async def _finish_when_writable(
        self, run: Run, final: Job, event: OutboxEvent | None, error: StoreError
    ) -> None:
        delay = JOURNAL_RETRY[-1]
        while True:
            log.error(
                "[courier] cannot record the end of id=%s attempt=%s (%s); trying again in %.0f s",
                final.content_request_id,
                final.attempt,
                error,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, STUCK_RETRY_MAX)
            try:
                finished = await self.store.finish(final, event)
            except StoreError as e:
                error = e
                continue
            self._finished(run, final, event, finished)
            return

    def _finished(self, run: Run, final: Job, event: OutboxEvent | None, written: bool) -> bool:
        """After the final write's answer: free the run's place, report and deliver once."""
        self.runs.pop(final.prompt_id)
        run.job = final
        if not written:  # another path finished it first, or another process took it over
            log.info(
                "[courier] id=%s attempt=%s epoch=%s: not recorded as %s; it ended already "
                "or another instance took it over",
                final.content_request_id,
                final.attempt,
                final.epoch,
                final.state.value,
            )
            return False
        self.uploader.discard_files(run)  # its final event is committed: not needed again
        self._report_final(final)
        if event is not None and self.deliverer is not None:
            self.deliverer.deliver_now(event)
        return True

    def _report_final(self, job: Job) -> None:
        if job.started_at is not None and job.finished_at is not None:
            self.runs.recent.append(max(0.0, job.finished_at - job.started_at))
        error = job.error_type.value if job.error_type else ""
        self.metrics.jobs_final.labels(job.state.value, error).inc()
        self.metrics.job_duration.observe(max(0.0, (job.finished_at or 0.0) - job.created_at))
        if job.error_type is None:
            log.info(
                "[courier] success id=%s attempt=%s prompt=%s images=%d %s",
                job.content_request_id,
                job.attempt,
                job.prompt_id,
                len(job.image_urls),
                _timings_text(job),
            )
        else:
            log.warning(
                "[courier] error id=%s attempt=%s prompt=%s type=%s %s: %s",
                job.content_request_id,
                job.attempt,
                job.prompt_id,
                error,
                _timings_text(job),
                job.error_message,
            )


def _failure(run: Run, completion: Completion) -> tuple[ErrorType, str, str | None]:
    """The error a failed prompt ends with, from ComfyUI's status messages."""
    for event, data in completion.messages:
        if event == "execution_error":
            node = data.get("node_id")
            where = f"{data.get('node_type', 'node')} (node {node})" if node else "a node"
            message = (
                f"{where} failed: {data.get('exception_type', 'Error')}: "
                f"{data.get('exception_message', '')}".strip()
            )
            return ErrorType.EXECUTION, message, str(node) if node is not None else None
        if event == "execution_interrupted":
            node = data.get("node_id")
            node_id = str(node) if node is not None else None
            if run.job.cancel_requested:
                return ErrorType.CANCELLED, "cancelled while running (DELETE request)", node_id
            return ErrorType.INTERRUPTED, "interrupted in ComfyUI while running", node_id
    return ErrorType.EXECUTION, f"ComfyUI reported {completion.status_str!r}", None


def _node_order(node_id: str) -> tuple[int, int | str]:
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


def _timings_text(job: Job) -> str:
    """`queued_ms=12.0 execution_ms=830.5 ...`: the job's life in its one INFO line."""
    return " ".join(f"{name}={value}" for name, value in job.timings().items())
