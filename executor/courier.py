"""The courier: accepts jobs, follows them through ComfyUI, stores images, reports once.

Everything here runs on ComfyUI's server loop. The journal is the source of truth; the
in-memory `_runs` map only holds the upload tasks of jobs this process is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sqlite3
import statistics
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from . import intake, redelivery
from .comfy_port import ComfyPort, Completion, QueueSnapshot
from .delivery import Deliverer
from .errors import (
    Conflict,
    IdempotencyConflict,
    NotFound,
    QueueFull,
    StorageError,
    WorkflowRejected,
)
from .ids import uuid7
from .images import EncodedImage, sanitize_file
from .jobs import CallbackSummary, ErrorType, Job, JobState, Output, callback_body, status_body
from .journal import Journal, OutboxEvent
from .journal_runner import GroupCommit, JournalRunner
from .keyed_lock import KeyedLock
from .metrics import Metrics
from .settings import Settings
from .status_updates import StatusNotifier
from .storage import Storage
from .uploads import upload_with_retry

log = logging.getLogger(__name__)

CLIENT_ID = "comfy-courier"
WATCH_INTERVAL = 0.5
CANCEL_POLL_TICKS = 4  # DELETEs that reached a sibling instance are read every 2 s
JOURNAL_RETRY = (0.1, 0.5, 2.0, 5.0)  # waits between tries of a final-state write
HEARTBEAT_INTERVAL = 15.0
STALE_AFTER = 90.0  # an instance silent this long has its work adopted by a live one
PRUNE_INTERVAL = 3600.0
# Intake waits behind a pruning batch in the journal process: on a 100k-job journal 50
# attempts hold it 3 ms at p50 and ~20 ms at p99, when the batch runs a WAL checkpoint
# (benchmarks/bench_journal.py). The pause leaves the journal idle ~97 % of a long prune.
PRUNE_BATCH = 50
PRUNE_PAUSE = 0.1


@dataclass(slots=True)
class Run:
    """A job this process put on ComfyUI's queue and has not finished yet."""

    job: Job
    uses_node: bool
    uploads: list[asyncio.Future[Output]] = field(default_factory=list)
    next_seq: int = 1
    completed: bool = False
    progress: float | None = None  # of the running sampler, from ComfyUI's progress bars


class Courier:
    def __init__(
        self,
        settings: Settings,
        comfy: ComfyPort,
        db: JournalRunner,
        storage: Storage,
        instance: str,
        deliverer: Deliverer | None = None,
        clock: Callable[[], float] = time.time,
        upload_schedule: tuple[float, ...] = (0.5, 2.0, 8.0),
        status: StatusNotifier | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.comfy = comfy
        self.db = db
        self.storage = storage
        self.instance = instance
        self.deliverer = deliverer
        self.clock = clock
        self.upload_schedule = upload_schedule
        self.status_updates = status
        self.metrics = metrics or Metrics()
        # settings.problems, plus what start-up checks find (wiring.check_storage appends)
        self.config_problems: list[str] = list(settings.problems)
        if deliverer is not None:
            deliverer.on_outcome = lambda outcome: self.metrics.callback_attempts.labels(
                outcome
            ).inc()
        self.ready = asyncio.Event()
        self._runs: dict[str, Run] = {}  # also the queue limit's count of unfinished jobs
        # admitted, and put on ComfyUI's queue once its 202 is written (_put_admitted); a
        # dict for its order
        self._unqueued: dict[str, None] = {}
        self._admitting = 0  # requests between the queue-limit check and their insert
        self._recent_runs: deque[float] = deque(maxlen=20)  # start to end, s (Retry-After)
        self._admit = GroupCommit(db, Journal.admit)
        self._done_seen: set[str] = set()  # written by ComfyUI's worker thread
        self._id_locks = KeyedLock()  # concurrent requests for one id never both run
        self._recovering = asyncio.Lock()  # one recovery at a time: none queues a job twice
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous process left, then watch the queue and deliver."""
        self._loop = asyncio.get_running_loop()
        self.comfy.on_start(self._start_from_worker)
        self.comfy.on_progress(self._progress_from_worker)
        self.comfy.on_completion(self._completion_from_worker)
        await self.db(Journal.heartbeat, self.instance, self.clock())
        await self.adopt_orphans()
        await self.recover()
        self.ready.set()
        self._spawn(self._watch())
        self._spawn(self._keep_alive())
        self._spawn(self._prune_periodically())
        if self.deliverer is not None:
            self._spawn(self.deliverer.run())

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("[courier] background task failed", exc_info=task.exception())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.deliverer is not None:
            await self.deliverer.close()

    # -- intake -------------------------------------------------------------------------

    async def submit(self, request: intake.Request) -> tuple[int, dict[str, Any]]:
        """Accept a job (202), replay a duplicate (200), or raise the matching error.

        The happy path makes one journal call: the workflow is validated first, then one
        transaction applies the duplicate rule and inserts. The answers keep the contract's
        order (duplicate, 429, validation): the rarer paths read the journal again.
        """
        cid = request.content_request_id
        async with self._id_locks(cid):
            if len(self._runs) + self._admitting >= self.settings.max_queue:
                replay = await self._duplicate_answer(request)
                if replay is not None:
                    return replay
                raise QueueFull(
                    f"comfy-courier has {len(self._runs)} unfinished jobs "
                    f"(COURIER_MAX_QUEUE={self.settings.max_queue}); try again later",
                    retry_after=self._retry_after(),
                )
            self._admitting += 1  # holds a place in the queue limit while validating
            try:
                job = Job(
                    content_request_id=cid,
                    attempt=0,  # set by Journal.admit
                    prompt_id=str(uuid7()),
                    instance=self.instance,
                    workflow=request.canonical,
                    fingerprint=request.fingerprint,
                    created_at=self.clock(),
                )
                try:
                    prompt, outputs = await self._validated_prompt(job, request.workflow)
                except WorkflowRejected:
                    replay = await self._duplicate_answer(request)
                    if replay is not None:
                        return replay
                    raise
                # The enqueue follows the commit inside the group commit, so a committed job
                # reaches ComfyUI's queue even if this request is cancelled meanwhile (its
                # retry then gets a replay).
                uses_node = intake.uses_courier_node(request.workflow)
                blocking, position = await self._admit(
                    job,
                    partial(self._enqueue_admitted, job, uses_node),
                    partial(self._put_admitted, job, prompt, outputs),
                )
                if blocking is not None:
                    return await self._replay(blocking, request)
            finally:
                self._admitting -= 1
        # INFO has one line per job, its outcome (see _report_final); a line here would cost
        # intake ~37 µs of loop time per request in ComfyUI's log handler (measured).
        log.debug("[courier] queued id=%s attempt=%s prompt=%s", cid, job.attempt, job.prompt_id)
        self.metrics.jobs_accepted.inc()
        # No status read: the job was queued a moment ago on this loop and has no event yet.
        callback = CallbackSummary("pending" if self._will_call_back(job) else "none")
        body = status_body(job, callback, position, 0.0)
        if self.status_updates is not None:
            self.status_updates.update(job, "queued", 0.0)
        return 202, body

    def _enqueue_admitted(
        self, job: Job, uses_node: bool, admitted: Job | int
    ) -> tuple[Job | None, int]:
        """Once the journal has answered: register the job, unless an attempt blocks it.

        Registered now, with the place in the queue it will have; put on ComfyUI's queue
        by `_put_admitted` just after this request's task has written its 202. A put
        wakes ComfyUI's idle worker thread, which takes the GIL at the loop's next pause
        and keeps it for milliseconds while the prompt starts: put before the answer,
        half the 202s waited ~2.4 ms for it (measured on 0.33.0).
        """
        if isinstance(admitted, Job):
            return admitted, 0
        job.attempt = admitted
        position = self.comfy.queue_length() + len(self._unqueued)
        self._runs[job.prompt_id] = Run(job, uses_node)
        self._unqueued[job.prompt_id] = None
        return None, position

    def _put_admitted(
        self,
        job: Job,
        prompt: dict[str, Any],
        outputs: list[str],
        answer: tuple[Job | None, int],
    ) -> None:
        if answer[0] is not None:
            return  # a replay or a conflict: nothing was admitted
        del self._unqueued[job.prompt_id]
        run = self._runs.get(job.prompt_id)
        if run is None or run.completed:
            return  # cancelled meanwhile
        try:
            self._put(job, prompt, outputs)
        except Exception as e:
            log.exception("[courier] ComfyUI did not queue id=%s", job.content_request_id)
            # The put may have failed after queueing it (in ComfyUI's queue_updated): take
            # it back. The removal calls queue_updated too, so it may fail the same way; a
            # job still queued, or already run, ends through the worker as usual.
            with contextlib.suppress(Exception):
                self.comfy.remove_pending(job.prompt_id)
            if job.prompt_id in self.comfy.queue_snapshot() or job.prompt_id in self._done_seen:
                return
            run.completed = True
            self._spawn(self._finish(run, ErrorType.LOST, f"ComfyUI did not queue it: {e}"))

    async def _duplicate_answer(self, request: intake.Request) -> tuple[int, dict[str, Any]] | None:
        """The duplicate rule's answer for `request` (200 replay, or raises 409), if any."""
        latest = await self.db(Journal.latest, request.content_request_id)
        if latest is None or not latest.blocks(request.fingerprint):
            return None
        return await self._replay(latest, request)

    async def _replay(self, latest: Job, request: intake.Request) -> tuple[int, dict[str, Any]]:
        if latest.fingerprint != request.fingerprint:
            raise IdempotencyConflict(
                f"content_request_id {latest.content_request_id!r} was already accepted with "
                "a different workflow; use a new id for a new request",
                content_request_id=latest.content_request_id,
            )
        return 200, await self._status(latest)

    async def _validated_prompt(
        self, job: Job, workflow: dict[str, Any]
    ) -> tuple[dict[str, Any], list[str]]:
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

    def _enqueue(
        self, job: Job, prompt: dict[str, Any], outputs: list[str], uses_node: bool
    ) -> None:
        self._runs[job.prompt_id] = Run(job, uses_node)
        self._put(job, prompt, outputs)

    def _put(self, job: Job, prompt: dict[str, Any], outputs: list[str]) -> None:
        extra_data = {
            "client_id": self.comfy.client_id,
            "create_time": int(self.clock() * 1000),
            "courier": {"content_request_id": job.content_request_id, "attempt": job.attempt},
        }
        self.comfy.enqueue(job.prompt_id, prompt, extra_data, outputs)

    def _position(self, prompt_id: str, snapshot: QueueSnapshot | None) -> int | None:
        if prompt_id in self._unqueued:
            return self.comfy.queue_length() + list(self._unqueued).index(prompt_id)
        return (snapshot or self.comfy.queue_snapshot()).position(prompt_id)

    def _retry_after(self) -> int:
        """Seconds until a place under COURIER_MAX_QUEUE likely frees: one job's run (start
        to end, uploads included), the median of recent ones; 10 before any has ended."""
        if not self._recent_runs:
            return 10
        return min(60, max(1, math.ceil(statistics.median(self._recent_runs))))

    # -- status and cancel --------------------------------------------------------------

    async def status(self, content_request_id: str) -> dict[str, Any]:
        job = await self.db(Journal.latest, content_request_id)
        if job is None:
            raise NotFound(f"no job with content_request_id {content_request_id!r}")
        return await self._status(job)

    async def _status(self, job: Job, snapshot: QueueSnapshot | None = None) -> dict[str, Any]:
        summary = await self.db(Journal.callback_summary, job.content_request_id, job.attempt)
        if summary is None:
            summary = CallbackSummary("pending" if self._will_call_back(job) else "none")
        position = progress = None
        if not job.final:
            position = self._position(job.prompt_id, snapshot)
            run = self._runs.get(job.prompt_id)
            progress = run.progress if run is not None else None
            if progress is None and job.state is JobState.QUEUED:
                progress = 0.0
        return status_body(job, summary, position, progress)

    def _will_call_back(self, job: Job) -> bool:
        return self.settings.callback_url is not None and not job.final

    async def cancel(self, content_request_id: str) -> dict[str, Any]:
        async with self._id_locks(content_request_id):
            job = await self.db(Journal.latest, content_request_id)
            if job is None:
                raise NotFound(f"no job with content_request_id {content_request_id!r}")
            run = self._runs.get(job.prompt_id)
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
            await self._cancel_run(run)
            return await self.status(content_request_id)

    async def redeliver(
        self, content_request_id: str | None = None, dead_since: float | None = None
    ) -> list[OutboxEvent]:
        """Dead-lettered callbacks back to the outbox, sent by this instance (redelivery.py)."""
        return await redelivery.redeliver(
            self.db,
            self.deliverer,
            self.instance,
            self.clock(),
            content_request_id=content_request_id,
            dead_since=dead_since,
        )

    async def _cancel_run(self, run: Run) -> None:
        """Take a job of this process off the queue, or interrupt it while it runs."""
        job = run.job
        if job.prompt_id in self._unqueued or self.comfy.remove_pending(job.prompt_id):
            run.completed = True
            await self._finish(run, ErrorType.CANCELLED, "cancelled before it ran (DELETE request)")
            return
        job.cancel_requested = True
        await self.db(Journal.set_state, job.prompt_id, job.state, cancel_requested=1)
        if not self.comfy.interrupt(job.prompt_id):
            log.warning(
                "[courier] cancel id=%s: prompt not running, waiting", job.content_request_id
            )

    async def _cancel_elsewhere(self, job: Job) -> None:
        """A job of another ComfyUI sharing this journal (one per GPU behind one address).

        The request goes through the journal; that instance's queue watch acts on it.
        """
        if not await self.db(Journal.request_cancel, job.content_request_id, job.attempt):
            raise Conflict(
                f"job {job.content_request_id!r} has finished executing; nothing to cancel",
                state=job.state.value,
            )
        log.info(
            "[courier] cancel id=%s: asked instance %s through the journal",
            job.content_request_id,
            job.instance,
        )

    async def _apply_cancel_requests(self) -> None:
        """Cancel the jobs of this process that a sibling instance was asked to cancel."""
        for prompt_id in await self.db(Journal.cancel_requests, self.instance):
            run = self._runs.get(prompt_id)
            if run is None or run.completed or run.job.cancel_requested:
                continue
            if run.job.state in (JobState.QUEUED, JobState.RUNNING):  # not once it uploads
                await self._cancel_run(run)

    # -- from ComfyUI's worker thread ---------------------------------------------------

    def from_worker(self, callback: Callable[..., Any], *args: Any) -> None:
        """Hand `callback(*args)` from ComfyUI's worker thread to the loop.

        While ComfyUI exits the worker may finish a prompt after the loop has closed. The
        job is then left to the journal: the next start recovers it.
        """
        if self._loop is None:  # a UI run before the courier started: nothing to track
            log.debug("[courier] not started; %s dropped", getattr(callback, "__name__", callback))
            return
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed
            log.debug("[courier] loop closed; %s dropped", getattr(callback, "__name__", callback))

    def _start_from_worker(self, prompt_id: str) -> None:
        """Called on the worker thread as it takes a prompt: the job's execution starts."""
        self.from_worker(self._on_start, prompt_id, self.clock())

    def _on_start(self, prompt_id: str, started_at: float) -> None:
        run = self._runs.get(prompt_id)
        if run is not None and run.job.state is JobState.QUEUED:
            self._spawn(self._mark_running(run, started_at))

    def _progress_from_worker(self, prompt_id: str, fraction: float) -> None:
        """Called on the worker thread by ComfyUI's progress bars."""
        if prompt_id in self._runs:
            self.from_worker(self._on_progress, prompt_id, fraction)

    def _on_progress(self, prompt_id: str, fraction: float) -> None:
        run = self._runs.get(prompt_id)
        if run is None or run.completed:
            return
        run.progress = fraction
        if self.status_updates is not None:
            self.status_updates.update(run.job, "running", fraction)

    def _completion_from_worker(self, completion: Completion) -> None:
        """Called on the worker thread just before ComfyUI's task_done: never block here."""
        self._done_seen.add(completion.prompt_id)
        self.from_worker(self._on_completion, completion)

    def images_saved(
        self,
        prompt_id: str,
        node_id: str,
        content_request_id: str,
        images: list[tuple[EncodedImage, Path]],
    ) -> None:
        """The node saved images (runs on the loop; the node reached it via from_worker).

        Registering synchronously keeps the order with the completion that follows.
        """
        run = self._runs.get(prompt_id)
        if run is None:
            if content_request_id:
                log.warning(
                    "[courier] images of prompt %s arrived after its job ended; not sent", prompt_id
                )
                return
            self._spawn(self._upload_ui_run(prompt_id, node_id, images))
            return
        if run.job.state is JobState.QUEUED:
            self._spawn(self._mark_running(run))
        for index, (image, path) in enumerate(images):
            self._start_upload(run, node_id, index, image.data, image, path)

    def _start_upload(
        self,
        run: Run,
        node_id: str,
        index: int,
        data: bytes,
        image: EncodedImage,
        path: Path | None,
    ) -> None:
        seq = run.next_seq
        run.next_seq += 1
        job = run.job
        output = Output(
            node_id=node_id,
            index=index,
            key=f"{job.content_request_id}/{job.attempt}-{seq}.{image.extension}",
            content_type=image.content_type,
            bytes=len(data),
            width=image.width,
            height=image.height,
            path=str(path) if path else None,
        )
        run.uploads.append(asyncio.ensure_future(self._upload(job, seq, output, data)))

    async def _upload(self, job: Job, seq: int, output: Output, data: bytes) -> Output:
        # The image's row is queued on the journal thread first, so it commits before the
        # job's later writes (uploading, final): a crash still finds it. The upload need
        # not wait for that commit.
        recorded = self.db.submit(Journal.record_image, job, seq, output)
        try:
            url = await self._store(output.key, data, output.content_type)
        finally:
            await recorded
        stored = replace(output, url=url)
        # Not awaited: queued now, it commits before the job's final write, which is
        # queued later on the same thread. The callback leaves one journal trip sooner.
        self.db.submit(Journal.record_image, job, seq, stored).add_done_callback(_log_failure)
        return stored

    async def _store(self, key: str, data: bytes, content_type: str) -> str:
        started = time.perf_counter()
        try:
            url = await upload_with_retry(
                self.storage, key, data, content_type, self.upload_schedule
            )
        except Exception:
            self.metrics.upload_failures.inc()
            raise
        self.metrics.upload_duration.observe(time.perf_counter() - started)
        self.metrics.upload_bytes.inc(len(data))
        return url

    async def _upload_ui_run(
        self, prompt_id: str, node_id: str, images: list[tuple[EncodedImage, Path]]
    ) -> None:
        urls: list[str] = []
        errors: list[str] = []
        for n, (image, _) in enumerate(images, start=1):
            key = f"ui/{prompt_id}/{node_id}-{n}.{image.extension}"
            try:
                urls.append(await self._store(key, image.data, image.content_type))
                log.info("[courier] UI run prompt=%s image stored: %s", prompt_id, urls[-1])
            except StorageError as e:
                errors.append(e.message)
                log.error("[courier] UI run prompt=%s upload failed: %s", prompt_id, e.message)
        data: dict[str, Any] = {
            "prompt_id": prompt_id,
            "node_id": node_id,
            "content_request_id": "",
            "urls": urls,
        }
        if errors:
            data["error"] = errors[0]
        self.comfy.notify_client(prompt_id, "comfy-courier.images", data)

    # -- completion ---------------------------------------------------------------------

    def _on_completion(self, completion: Completion) -> None:
        run = self._runs.get(completion.prompt_id)
        if run is None or run.completed:
            self._done_seen.discard(completion.prompt_id)
            return
        run.completed = True
        self._spawn(self._complete(run, completion))

    async def _complete(self, run: Run, completion: Completion) -> None:
        job = run.job
        job.executed_at = self.clock()
        if job.started_at is None:
            job.started_at = job.executed_at
        try:
            await self._settle(run, completion)
        except sqlite3.Error:
            # the journal is failing: leave the job unfinished for the next start-up rather
            # than report an outcome it did not have
            log.exception("[courier] journal failed while finishing id=%s", job.content_request_id)
        except Exception as e:  # whatever else breaks, the job still ends with one callback
            log.exception("[courier] finishing id=%s failed", job.content_request_id)
            await self._finish(run, ErrorType.EXECUTION, f"comfy-courier failed: {e!r}"[:500])
        finally:
            self._done_seen.discard(completion.prompt_id)

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
            error_type, message, node_id = self._failure(run, completion)
            await self._finish(run, error_type, message, node_id)
            return
        if not run.uses_node:
            await self._collect_saved_files(run, completion)
        await self.db(
            Journal.set_state,
            job.prompt_id,
            JobState.UPLOADING,
            executed_at=job.executed_at,
            started_at=job.started_at,
            expected_images=len(run.uploads),
        )
        job.state = JobState.UPLOADING
        log.debug(
            "[courier] uploading id=%s prompt=%s images=%d",
            job.content_request_id,
            job.prompt_id,
            len(run.uploads),
        )
        await self._finish_uploads(run)

    async def _finish_uploads(self, run: Run) -> None:
        results = await asyncio.gather(*run.uploads, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            first = failures[0]
            message = first.message if isinstance(first, StorageError) else repr(first)
            await self._finish(run, ErrorType.UPLOAD, f"image upload failed: {message}")
            return
        outputs = [r for r in results if isinstance(r, Output)]
        if not outputs:
            await self._finish(
                run,
                ErrorType.EXECUTION,
                "the workflow finished without producing an image "
                "(add a SaveAndCallback or SaveImage node)",
            )
            return
        await self._finish(run, None, None, outputs=outputs)

    async def _collect_saved_files(self, run: Run, completion: Completion) -> None:
        """A workflow without SaveAndCallback: deliver its SaveImage files, metadata stripped."""
        for saved in self.comfy.output_files(completion.outputs):
            try:
                raw = await asyncio.to_thread(saved.path.read_bytes)
                image = await asyncio.to_thread(sanitize_file, raw, self.settings.keep_metadata)
            except (OSError, ValueError) as e:
                failed: asyncio.Future[Output] = asyncio.get_running_loop().create_future()
                failed.set_exception(StorageError(f"cannot read {saved.path.name}: {e}", False))
                run.uploads.append(failed)
                continue
            self._start_upload(run, saved.node_id, saved.index, image.data, image, saved.path)

    def _failure(self, run: Run, completion: Completion) -> tuple[ErrorType, str, str | None]:
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

    async def _mark_running(self, run: Run, started_at: float | None = None) -> None:
        job = run.job
        if job.state is not JobState.QUEUED:
            return
        job.state = JobState.RUNNING
        job.started_at = started_at or self.clock()
        if self.status_updates is not None:
            self.status_updates.update(job, "running", 0.0)
        await self.db(Journal.set_state, job.prompt_id, JobState.RUNNING, started_at=job.started_at)
        log.debug("[courier] running id=%s prompt=%s", job.content_request_id, job.prompt_id)

    async def _finish(
        self,
        run: Run,
        error_type: ErrorType | None,
        message: str | None,
        node_id: str | None = None,
        outputs: list[Output] | None = None,
    ) -> bool:
        """Commit the final state and its callback event, once. False if already final.

        The journal gets a snapshot; the live job changes only once the commit is done.
        A journal that keeps failing leaves the job unfinished in memory and on disk: the
        next start-up recovers it, so it is never reported with a made-up outcome.
        """
        run.completed = True
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
        finished = await self._commit_final(final, event)
        if finished is None:
            return False
        self._runs.pop(final.prompt_id, None)
        run.job = final
        if not finished:
            return False
        self._report_final(final)
        if event is not None and self.deliverer is not None:
            self.deliverer.deliver_now(event)
        return True

    async def _commit_final(self, final: Job, event: OutboxEvent | None) -> bool | None:
        """Journal.finish with retries; None when the journal stays unwritable."""
        for delay in (*JOURNAL_RETRY, None):
            try:
                return await self.db(Journal.finish, final, event)
            except sqlite3.Error as e:
                if delay is None:
                    log.critical(
                        "[courier] cannot record the end of id=%s attempt=%s (%s); it will be "
                        "recovered at the next start",
                        final.content_request_id,
                        final.attempt,
                        e,
                    )
                    return None
                log.error("[courier] journal write failed (%s); retrying in %.1f s", e, delay)
                await asyncio.sleep(delay)
        return None

    def _report_final(self, job: Job) -> None:
        if job.started_at is not None and job.finished_at is not None:
            self._recent_runs.append(max(0.0, job.finished_at - job.started_at))
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

    # -- watching the queue -------------------------------------------------------------

    async def _watch(self) -> None:
        ticks = 0
        while True:
            ticks += 1
            try:
                await self.watch_once()
                if self._runs and ticks % CANCEL_POLL_TICKS == 0:
                    await self._apply_cancel_requests()
            except Exception:
                log.exception("[courier] queue watch failed")
            await asyncio.sleep(WATCH_INTERVAL)

    async def watch_once(self) -> None:
        """Notice jobs that started, ran too long, or vanished from ComfyUI's queue."""
        if not self._runs:
            return
        if self.comfy.worker_alive() is False:
            await self._worker_died()
            return
        snapshot = self.comfy.queue_snapshot()
        now = self.clock()
        # Set operations, not a loop over every job: a long queue costs the loop little.
        # Both lists are taken before the first await, so no job queued later is in them.
        running = [p for p in snapshot.running if p in self._runs]
        vanished = (
            self._runs.keys() - snapshot.pending.keys() - snapshot.running - self._unqueued.keys()
        )
        for prompt_id in running:
            run = self._runs.get(prompt_id)
            if run is None or run.completed or prompt_id in self._done_seen:
                continue
            job = run.job
            if job.state is JobState.QUEUED:
                await self._mark_running(run)
            if job.cancel_requested:
                # ComfyUI clears its interrupt flag when a prompt starts: a DELETE that
                # landed just before would be lost without asking again.
                self.comfy.interrupt(prompt_id)
            started = job.started_at or now
            if now - started > self.settings.job_timeout:
                self.comfy.interrupt(prompt_id)
                run.completed = True
                await self._finish(
                    run,
                    ErrorType.TIMEOUT,
                    f"ran longer than {self.settings.job_timeout:g} s "
                    "(COURIER_JOB_TIMEOUT); interrupted",
                )
        for prompt_id in vanished:
            run = self._runs.get(prompt_id)
            if run is None or run.completed or prompt_id in self._done_seen:
                continue  # ended meanwhile, or its completion is on its way
            run.completed = True
            await self._finish(
                run, ErrorType.CANCELLED, "removed from ComfyUI's queue before it ran"
            )

    async def _worker_died(self) -> None:
        """ComfyUI's prompt worker thread is gone: nothing queued will ever run."""
        log.critical("[courier] ComfyUI's prompt worker thread died; restart ComfyUI")
        for run in list(self._runs.values()):
            if not run.completed and run.job.state in (JobState.QUEUED, JobState.RUNNING):
                await self._finish(
                    run,
                    ErrorType.LOST,
                    "ComfyUI's prompt worker stopped (see its log); restart ComfyUI and retry",
                )

    async def _keep_alive(self) -> None:
        """Heartbeat this instance; adopt the work of instances that went silent."""
        beats = 0
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            try:
                await self.db(Journal.heartbeat, self.instance, self.clock())
                beats += 1
                if beats % 4 == 0 and await self.adopt_orphans():
                    await self.recover()
            except Exception:
                log.exception("[courier] heartbeat failed")

    async def _prune_periodically(self) -> None:
        while True:
            try:
                await self.prune()
            except Exception:
                log.exception("[courier] journal pruning failed")
            await asyncio.sleep(PRUNE_INTERVAL)

    async def prune(self) -> int:
        """Slim finished jobs older than COURIER_RETENTION_DAYS to their outcome; how many.

        Without it the journal grows by ~3 KB a job forever, with it by ~0.4 KB. One
        batch per journal call, so an admission waits behind one batch at most.
        """
        days = self.settings.retention_days
        if not days:
            return 0
        cutoff = self.clock() - days * 86400
        total = 0
        while True:
            pruned = await self.db(Journal.prune, cutoff, PRUNE_BATCH)
            total += pruned
            self.metrics.jobs_pruned.inc(pruned)
            if pruned < PRUNE_BATCH:
                break
            await asyncio.sleep(PRUNE_PAUSE)
        if total:
            log.info("[courier] pruned %d jobs that finished over %g days ago", total, days)
        return total

    async def adopt_orphans(self) -> list[str]:
        adopted = await self.db(Journal.adopt_stale, self.instance, self.clock(), STALE_AFTER)
        for name in adopted:
            log.warning("[courier] adopted the unfinished work of silent instance %s", name)
        if adopted and self.deliverer is not None:
            self.deliverer.wake()
        return adopted

    # -- recovery -----------------------------------------------------------------------

    def journal_lost(self) -> None:
        """The journal process died mid-call: requeue what it committed but never answered.

        An admission it wrote just before dying is in the journal but not in ComfyUI's queue
        (its request got a 503; the retry gets a replay); `recover` resubmits it.
        """
        if self.ready.is_set():
            self._spawn(self.recover())

    async def recover(self) -> None:
        """Finish or resubmit what a previous process of this instance left unfinished.

        Start-up, the heartbeat's adoption and a lost journal process each call this; one
        at a time, since a job being resubmitted is not in `_runs` under its old prompt_id.
        """
        async with self._recovering:
            for job in await self.db(Journal.unfinished, self.instance):
                if job.prompt_id in self._runs:
                    continue  # this process runs it
                try:
                    await self._recover(job)
                except Exception:
                    log.exception("[courier] could not recover id=%s", job.content_request_id)

    async def _recover(self, job: Job) -> None:
        workflow = json.loads(job.workflow)
        run = Run(job, intake.uses_courier_node(workflow), completed=True)
        if job.state is JobState.UPLOADING and await self._resume_uploads(run):
            log.info(
                "[courier] recovered uploads id=%s attempt=%s", job.content_request_id, job.attempt
            )
            self._spawn(self._finish_uploads(run))
            return
        if job.cancel_requested:  # never run again what was asked to stop
            self._runs[job.prompt_id] = run
            await self._finish(
                run,
                ErrorType.CANCELLED,
                "cancelled while running (DELETE request); ComfyUI stopped before the prompt ended",
            )
            return
        if job.runs >= self.settings.max_attempts:
            self._runs[job.prompt_id] = run
            await self._finish(
                run,
                ErrorType.LOST,
                f"ComfyUI stopped while this job was {job.state.value} "
                f"({job.runs} run(s); COURIER_MAX_ATTEMPTS="
                f"{self.settings.max_attempts})",
            )
            return
        old_prompt_id = job.prompt_id
        job.prompt_id = str(uuid7())
        try:
            prompt, outputs = await self._validated_prompt(job, workflow)
        except WorkflowRejected as e:
            job.prompt_id = old_prompt_id
            self._runs[job.prompt_id] = run
            await self._finish(
                run,
                ErrorType.VALIDATION,
                f"resubmission after a restart failed validation: {e.message}",
            )
            return
        if not await self.db(Journal.resubmitted, old_prompt_id, job.prompt_id, self.clock()):
            return  # it ended while this recovery worked through its list
        job.runs += 1
        job.state = JobState.QUEUED
        job.started_at = job.executed_at = None
        self._enqueue(job, prompt, outputs, run.uses_node)
        log.info(
            "[courier] resubmitted id=%s attempt=%s prompt=%s run=%s",
            job.content_request_id,
            job.attempt,
            job.prompt_id,
            job.runs,
        )

    async def _resume_uploads(self, run: Run) -> bool:
        """Upload what the dead process had not; False when a saved file is missing."""
        job = run.job
        recorded = await self.db(Journal.images, job.content_request_id, job.attempt)
        if job.expected_images is None or len(recorded) != job.expected_images:
            return False
        pending: list[tuple[int, Output, bytes]] = []
        for seq, output in recorded:
            if output.url:
                continue
            try:
                data = await asyncio.to_thread(Path(output.path or "").read_bytes)
            except OSError:
                return False
            if not run.uses_node:
                data = (
                    await asyncio.to_thread(sanitize_file, data, self.settings.keep_metadata)
                ).data
            pending.append((seq, output, data))
        for _, output in recorded:
            if output.url:  # stored before the restart: not uploaded again
                done: asyncio.Future[Output] = asyncio.get_running_loop().create_future()
                done.set_result(output)
                run.uploads.append(done)
        for seq, output, data in pending:
            run.uploads.append(asyncio.ensure_future(self._upload(job, seq, output, data)))
        self._runs[job.prompt_id] = run
        return True

    # -- health -------------------------------------------------------------------------

    async def metrics_text(self) -> bytes:
        snapshot = self.comfy.queue_snapshot()
        pending, dead = await self.db(Journal.outbox_backlog)
        return self.metrics.render(
            {
                "courier_unfinished_jobs": len(self._runs),
                "courier_comfy_queue_pending": len(snapshot.pending),
                "courier_comfy_queue_running": len(snapshot.running),
                "courier_outbox_pending": pending,
                "courier_outbox_dead": dead,
            }
        )

    async def health(self) -> dict[str, Any]:
        snapshot = self.comfy.queue_snapshot()
        pending, dead = await self.db(Journal.outbox_backlog)
        return {
            "ok": True,
            "ready": self.ready.is_set(),
            "queue": {
                "comfy_running": len(snapshot.running),
                "comfy_pending": len(snapshot.pending),
                "courier_unfinished": len(self._runs),  # of this process, as the limit counts
                "courier_max": self.settings.max_queue,
            },
            "outbox": {
                "pending": pending,
                "dead": dead,
                "delivered_since_start": self.deliverer.sent if self.deliverer else 0,
            },
            "storage": self.storage.kind,
            "journal": self.db.kind,
            "callback_configured": self.settings.callback_url is not None,
            "signed_callbacks": bool(self.settings.webhook_secrets),
            "config_problems": len(self.config_problems),
        }


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("[courier] journal write failed", exc_info=future.exception())


def _node_order(node_id: str) -> tuple[int, int | str]:
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


def _timings_text(job: Job) -> str:
    """`queued_ms=12.0 execution_ms=830.5 ...`: the job's life in its one INFO line."""
    return " ".join(f"{name}={value}" for name, value in job.timings().items())
