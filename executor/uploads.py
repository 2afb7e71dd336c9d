"""A job's images on their way to storage, each recorded in the store before and after.

Uploads retry transient storage faults (bounded): those must not fail a job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_chain, wait_fixed

from .comfy_port import ComfyPort, Completion
from .errors import StorageError
from .images import EncodedImage, sanitize_file
from .jobs import Job, Output, object_key
from .metrics import Metrics
from .runs import Run
from .settings import Settings
from .storage import Storage
from .store import Store
from .tasks import Background

log = logging.getLogger(__name__)

RECORD_RETRY = (0.05, 0.2, 1.0)  # waits between tries of an image row


def _retryable(error: BaseException) -> bool:
    return isinstance(error, StorageError) and error.retryable


async def upload_with_retry(
    storage: Storage, key: str, data: bytes, content_type: str, schedule: Sequence[float]
) -> str:
    """Store `data` under `key` (an upsert, so repeating is safe) and return its URL.

    `schedule` is the wait before each retry; its length is the number of retries.
    The last error is raised as is once retries run out or the error is permanent.
    """
    retrying = AsyncRetrying(
        stop=stop_after_attempt(len(schedule) + 1),
        wait=wait_chain(*(wait_fixed(s) for s in schedule)) if schedule else wait_fixed(0),
        retry=retry_if_exception(_retryable),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await storage.put(key, data, content_type)
    raise AssertionError("unreachable: tenacity either returns or raises")


class Fenced(Exception):
    """The store refused an image row: another process took the run over."""


class Uploader:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        storage: Storage,
        comfy: ComfyPort,
        metrics: Metrics,
        schedule: tuple[float, ...],
        background: Background,
    ) -> None:
        self.background = background
        self.settings = settings
        self.store = store
        self.storage = storage
        self.comfy = comfy
        self.metrics = metrics
        self.schedule = schedule

    def start(
        self,
        run: Run,
        node_id: str,
        index: int,
        data: bytes,
        image: EncodedImage,
        path: Path | None,
    ) -> None:
        """Upload one image of `run` in the background; the job's end awaits it."""
        seq = run.next_seq
        run.next_seq += 1
        job = run.job
        if path is not None:
            run.files.append(path)
        output = Output(
            node_id=node_id,
            index=index,
            key=object_key(job, seq, image.extension),
            content_type=image.content_type,
            bytes=len(data),
            width=image.width,
            height=image.height,
            path=str(path) if path else None,
        )
        served = self.storage.url_of_file(path) if run.uses_node and path else None
        if served is not None:  # the node's own file, as it is: nothing to copy
            run.uploads.append(self._serve(job, seq, output, served))
            return
        run.uploads.append(asyncio.ensure_future(self._upload(job, seq, output, data)))

    def _serve(self, job: Job, seq: int, output: Output, url: str) -> asyncio.Future[Output]:
        """The image is where it is served from: done now. Its row is queued now, so it
        commits before the job's end (queued later), and is not awaited: the row is only
        what crash recovery resumes from, and the end, which the store refuses for a run
        taken over just as it would the row, waits for it anyway in the store's order.
        With a database far away that is one round trip less between the image and the
        callback."""
        stored = replace(output, url=url)
        self.background.spawn(self._record(job, seq, stored))  # queued now
        done: asyncio.Future[Output] = asyncio.get_running_loop().create_future()
        done.set_result(stored)
        return done

    def discard_files(self, run: Run) -> None:
        """Remove a finished courier job's files from ComfyUI's output folder.

        Only with remote storage (local storage serves them) and unless
        COURIER_KEEP_OUTPUTS=1: without it, every job leaves its images on the host for
        good. Runs from ComfyUI's UI keep theirs, as SaveImage does.
        """
        if self.storage.kind == "local" or self.settings.keep_outputs or not run.files:
            return
        self.background.spawn(asyncio.to_thread(_remove, list(run.files)))

    async def _upload(self, job: Job, seq: int, output: Output, data: bytes) -> Output:
        # The image's row is queued in the store first, so it commits before the job's
        # later writes (uploading, final): a crash still finds it. The upload need not
        # wait for that commit.
        recorded = asyncio.ensure_future(self._record(job, seq, output))  # queued now
        try:
            url = await self.put(output.key, data, output.content_type)
        finally:
            current = await recorded
        if not current:
            raise Fenced(f"another instance took over id={job.content_request_id}")
        stored = replace(output, url=url)
        # Not awaited: queued now, it commits before the job's final write, which is
        # queued later. The callback leaves one journal trip sooner.
        self.background.spawn(self._record(job, seq, stored))  # queued now
        return stored

    def _record(self, job: Job, seq: int, output: Output) -> Coroutine[Any, Any, bool]:
        """Record an image row, retried: it is what crash recovery resumes uploads from.

        The first try is queued in the store at once, so it keeps its place before the
        job's later writes. Never fails the job: an image in storage is delivered even if
        its row could not be written (a crash before the job's end then runs the prompt
        again instead of resuming its uploads).
        """
        return self._retry_record(job, seq, output, self.store.record_image(job, seq, output))

    async def _retry_record(
        self, job: Job, seq: int, output: Output, first: Awaitable[bool]
    ) -> bool:
        """True unless the store refused the row: the run was taken over (fenced)."""
        attempt = first
        for delay in (*RECORD_RETRY, None):
            try:
                return await attempt
            except Exception as e:  # the store's error, or the runner's (sqlite3)
                if delay is None:
                    log.error(
                        "[courier] could not record image %s of id=%s (%s); going on",
                        output.key,
                        job.content_request_id,
                        e,
                    )
                    return True
                await asyncio.sleep(delay)
                attempt = self.store.record_image(job, seq, output)
        return True

    async def put(self, key: str, data: bytes, content_type: str) -> str:
        started = time.perf_counter()
        try:
            url = await upload_with_retry(self.storage, key, data, content_type, self.schedule)
        except Exception:
            self.metrics.upload_failures.inc()
            raise
        self.metrics.upload_duration.observe(time.perf_counter() - started)
        self.metrics.upload_bytes.inc(len(data))
        return url

    async def ui_run(
        self, prompt_id: str, node_id: str, images: list[tuple[EncodedImage, Path]]
    ) -> None:
        """A run from ComfyUI's own UI: stored under ui/<prompt_id>/, shown in that tab."""
        urls: list[str] = []
        errors: list[str] = []
        for n, (image, _) in enumerate(images, start=1):
            key = f"ui/{prompt_id}/{node_id}-{n}.{image.extension}"
            try:
                urls.append(await self.put(key, image.data, image.content_type))
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

    async def collect_saved_files(self, run: Run, completion: Completion) -> None:
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
            self.start(run, saved.node_id, saved.index, image.data, image, saved.path)

    async def resume(self, run: Run) -> bool:
        """Upload what a dead process had not; False when a saved file is missing."""
        job = run.job
        recorded = await self.store.images(job.content_request_id, job.attempt)
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
            # under the run's new epoch: never the key a stalled owner may still write
            extension = output.key.rpartition(".")[2]
            pending.append((seq, replace(output, key=object_key(job, seq, extension)), data))
        for _, output in recorded:
            if output.url:  # stored before the restart: not uploaded again
                done: asyncio.Future[Output] = asyncio.get_running_loop().create_future()
                done.set_result(output)
                run.uploads.append(done)
        for seq, output, data in pending:
            run.uploads.append(asyncio.ensure_future(self._upload(job, seq, output, data)))
        return True


def _remove(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("[courier] could not remove %s: %s", path.name, e)
