"""Accepting a job: the queue limit, validation, the duplicate rule, and the commit.

The happy path makes one store call: the workflow is validated first, then one
transaction applies the duplicate rule and inserts. The answers keep the contract's
order (duplicate, 429, validation): the rarer paths read the store again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from . import intake
from .claims import Claimer
from .comfy_queue import ComfyQueue
from .errors import IdempotencyConflict, QueueFull, StoreError, WorkflowRejected
from .ids import uuid7
from .jobs import CallbackSummary, ErrorType, Job, status_body
from .keyed_lock import KeyedLock
from .metrics import Metrics
from .runs import Run, Runs
from .settings import Settings
from .settle import Settler
from .status import StatusReader
from .status_updates import StatusNotifier
from .store import Store
from .tasks import Background

log = logging.getLogger(__name__)


class Admission:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        runs: Runs,
        queue: ComfyQueue,
        status: StatusReader,
        settler: Settler,
        background: Background,
        id_locks: KeyedLock,
        instance: str,
        clock: Callable[[], float],
        metrics: Metrics,
        status_updates: StatusNotifier | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runs = runs
        self.queue = queue
        self.status = status
        self.settler = settler
        self.background = background
        self.id_locks = id_locks  # concurrent requests for one id never both run
        self.instance = instance
        self.clock = clock
        self.metrics = metrics
        self.status_updates = status_updates
        self.claims: Claimer | None = None  # with a store shared by several hosts

    async def submit(self, request: intake.Request) -> tuple[int, dict[str, Any]]:
        """Accept a job (202), replay a duplicate (200), or raise the matching error."""
        cid = request.content_request_id
        runs = self.runs
        claims = self.claims
        async with self.id_locks(cid):
            waiting = claims.waiting if claims is not None else 0  # the fleet's line
            if len(runs) + runs.admitting + waiting >= self.settings.max_queue:
                replay = await self._duplicate_answer(request)
                if replay is not None:
                    return replay
                raise QueueFull(
                    f"comfy-courier has {len(runs) + waiting} unfinished jobs "
                    f"(COURIER_MAX_QUEUE={self.settings.max_queue}); try again later",
                    retry_after=runs.retry_after(),
                )
            # With a shared store, a job this host cannot start now waits for any host.
            here = claims is None or claims.reserve()
            runs.admitting += 1  # holds a place in the queue limit while validating
            try:
                job = Job(
                    content_request_id=cid,
                    attempt=0,  # set by the store's admit
                    prompt_id=str(uuid7()),
                    instance=self.instance if here else "",
                    workflow=request.canonical,
                    fingerprint=request.fingerprint,
                    epoch=1 if here else 0,  # a claim raises it
                    created_at=self.clock(),
                )
                try:
                    prompt, outputs = await self.queue.validated_prompt(job, request.workflow)
                except WorkflowRejected:
                    replay = await self._duplicate_answer(request)
                    if replay is not None:
                        return replay
                    raise
                # The enqueue follows the commit inside the group commit, so a committed job
                # reaches ComfyUI's queue even if this request is cancelled meanwhile (its
                # retry then gets a replay).
                uses_node = intake.uses_courier_node(request.workflow)
                blocking, position = await self.store.admit(
                    job,
                    partial(self.register, job, uses_node, waiting),
                    partial(self.put, job, prompt, outputs),
                )
                if blocking is not None:
                    return await self._replay(blocking, request)
            finally:
                runs.admitting -= 1
                if claims is not None and here:
                    claims.unreserve()
        # INFO has one line per job, its outcome (see Settler); a line here would cost
        # intake ~37 µs of loop time per request in ComfyUI's log handler (measured).
        log.debug("[courier] queued id=%s attempt=%s prompt=%s", cid, job.attempt, job.prompt_id)
        self.metrics.jobs_accepted.inc()
        # No status read: the job was queued a moment ago on this loop and has no event yet.
        callback = CallbackSummary("pending" if self.status.will_call_back(job) else "none")
        body = status_body(job, callback, position, 0.0)
        if self.status_updates is not None:
            self.status_updates.update(job, "queued", 0.0)
        if job.attempt > 1 and self.settings.callback_url is not None:
            self.background.spawn(self._report_superseded(job))
        return 202, body

    def register(
        self, job: Job, uses_node: bool, ahead: int, admitted: Job | int
    ) -> tuple[Job | None, int]:
        """Once the store has answered: register the job, unless an attempt blocks it.

        Registered now, with the place in the queue it will have; put on ComfyUI's queue
        by `put` just after this request's task has written its 202. A put wakes
        ComfyUI's idle worker thread, which takes the GIL at the loop's next pause and
        keeps it for milliseconds while the prompt starts: put before the answer, half
        the 202s waited ~2.4 ms for it (measured on 0.33.0).
        """
        if isinstance(admitted, Job):
            return admitted, 0
        job.attempt = admitted
        if not job.instance:  # waiting for a host: in the fleet's line, not on this ComfyUI
            return None, ahead  # the fleet's waiting jobs as counted before it came
        position = self.queue.next_position()
        self.runs.add(Run(job, uses_node))
        self.runs.unqueued[job.prompt_id] = None
        return None, position

    def put(
        self,
        job: Job,
        prompt: dict[str, Any],
        outputs: list[str],
        answer: tuple[Job | None, int],
    ) -> None:
        if answer[0] is not None or not job.instance:
            return  # a replay or a conflict (nothing was admitted), or a waiting job
        del self.runs.unqueued[job.prompt_id]
        run = self.runs.get(job.prompt_id)
        if run is None or run.completed:
            return  # cancelled meanwhile
        comfy = self.queue.comfy
        try:
            self.queue.put(job, prompt, outputs)
        except Exception as e:
            log.exception("[courier] ComfyUI did not queue id=%s", job.content_request_id)
            # The put may have failed after queueing it (in ComfyUI's queue_updated): take
            # it back. The removal calls queue_updated too, so it may fail the same way; a
            # job still queued, or already run, ends through the worker as usual.
            with contextlib.suppress(Exception):
                comfy.remove_pending(job.prompt_id)
            if job.prompt_id in comfy.queue_snapshot() or job.prompt_id in self.runs.done_seen:
                return
            run.completed = True
            self.background.spawn(
                self.settler.finish(run, ErrorType.LOST, f"ComfyUI did not queue it: {e}")
            )

    async def _report_superseded(self, job: Job) -> None:
        """Say so when this attempt's commit dropped the previous attempt's callback.

        The commit that accepts attempt n+1 drops attempt n's event if it is still
        undelivered, so a late `error` can never land after the newer attempt's result;
        a send of it waiting for a delivery slot is not made (Deliverer._still_current).
        """
        previous = job.attempt - 1
        try:
            summary = await self.store.callback_summary(job.content_request_id, previous)
        except StoreError as e:
            log.warning(
                "[courier] could not read the callback of id=%s attempt=%s: %s",
                job.content_request_id,
                previous,
                e,
            )
            return
        if summary is None or summary.state != "dropped":
            return
        self.metrics.callbacks_superseded.inc()
        log.warning(
            "[courier] callback superseded id=%s attempt=%s: attempt %s was accepted before "
            "it was delivered (%s tries, last error: %s); no try starts after this",
            job.content_request_id,
            previous,
            job.attempt,
            summary.attempts,
            summary.last_error,
        )

    async def _duplicate_answer(self, request: intake.Request) -> tuple[int, dict[str, Any]] | None:
        """The duplicate rule's answer for `request` (200 replay, or raises 409), if any."""
        latest = await self.store.latest(request.content_request_id)
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
        return 200, await self.status.of(latest)
