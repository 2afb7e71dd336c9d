"""Job records: the states a job moves through and the values kept about it."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class JobState(str, enum.Enum):
    QUEUED = "queued"  # accepted and committed; on ComfyUI's pending queue
    RUNNING = "running"  # ComfyUI's worker is executing the prompt
    UPLOADING = "uploading"  # the prompt finished; waiting for this job's uploads
    SUCCESS = "success"  # final: every image delivered to storage
    ERROR = "error"  # final: see error_type

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCESS, JobState.ERROR)


UNFINISHED = (JobState.QUEUED, JobState.RUNNING, JobState.UPLOADING)


class ErrorType(str, enum.Enum):
    VALIDATION = "validation"  # rejected by ComfyUI when resubmitted after a restart
    EXECUTION = "execution"  # a node raised
    INTERRUPTED = "interrupted"  # interrupted by someone else (the UI's stop button)
    CANCELLED = "cancelled"  # DELETE /execute-workflow/{id} or removed from ComfyUI's queue
    TIMEOUT = "timeout"  # ran longer than COURIER_JOB_TIMEOUT
    UPLOAD = "upload"  # an image could not be stored
    LOST = "lost"  # ComfyUI stopped under it more often than COURIER_MAX_ATTEMPTS


@dataclass
class Output:
    """One delivered image, in the order of the callback's `image_urls`."""

    node_id: str
    index: int
    key: str
    content_type: str
    bytes: int
    width: int
    height: int
    url: str | None = None
    path: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "index": self.index,
            "url": self.url,
            "content_type": self.content_type,
            "bytes": self.bytes,
            "width": self.width,
            "height": self.height,
        }


@dataclass(slots=True)  # no per-job __dict__: fewer objects per queued job for the GC to track
class Job:
    content_request_id: str
    attempt: int
    prompt_id: str
    instance: str
    workflow: str  # canonical JSON of the workflow as received (for replay and resubmission)
    fingerprint: str  # sha256 of `workflow`: a retry with another workflow is a conflict
    state: JobState = JobState.QUEUED
    runs: int = 1  # this run, plus the runs of this attempt a dying process cut short
    # The claim's fencing token: raised whenever a process takes the attempt over (a
    # resubmission, an adoption); every write of a run must carry the current one.
    epoch: int = 1
    error_type: ErrorType | None = None
    error_message: str | None = None
    node_id: str | None = None
    image_urls: tuple[str, ...] = ()  # tuples: a queued job holds no empty lists
    outputs: tuple[Output, ...] = ()
    expected_images: int | None = None
    cancel_requested: bool = False
    created_at: float = 0.0
    started_at: float | None = None
    executed_at: float | None = None
    finished_at: float | None = None

    @property
    def final(self) -> bool:
        return self.state.final

    def blocks(self, fingerprint: str) -> bool:
        """Does this attempt stop a request for `fingerprint` from starting a new one?

        It does while it runs or once it succeeded (the request is a replay), and always
        when the workflow differs (a conflict); only a final error lets the same request
        start the next attempt.
        """
        return fingerprint != self.fingerprint or self.state is not JobState.ERROR

    def timings(self) -> dict[str, float]:
        """Milliseconds per phase, for the callback's `timings`."""
        out: dict[str, float] = {}
        if self.started_at is not None:
            out["queued_ms"] = round((self.started_at - self.created_at) * 1000, 1)
            if self.executed_at is not None:
                out["execution_ms"] = round((self.executed_at - self.started_at) * 1000, 1)
        if self.executed_at is not None and self.finished_at is not None:
            out["upload_ms"] = round((self.finished_at - self.executed_at) * 1000, 1)
        if self.finished_at is not None:
            out["total_ms"] = round((self.finished_at - self.created_at) * 1000, 1)
        return out


def object_key(job: Job, seq: int, extension: str) -> str:
    """`<id>/<attempt>-<n>.<ext>`; a run after a takeover writes `<id>/<attempt>_<epoch>-<n>`,
    so a fenced run's late uploads never overwrite what the current run delivers."""
    run = f"{job.attempt}" if job.epoch == 1 else f"{job.attempt}_{job.epoch}"
    return f"{job.content_request_id}/{run}-{seq}.{extension}"


@dataclass(frozen=True)
class CallbackSummary:
    state: str  # pending | delivered | dead | none
    attempts: int = 0
    last_error: str | None = None

    def public(self) -> dict[str, Any]:
        return {"state": self.state, "attempts": self.attempts, "last_error": self.last_error}


def status_body(
    job: Job,
    callback: CallbackSummary,
    queue_position: int | None = None,
    progress: float | None = None,
) -> dict[str, Any]:
    """The body of GET /execute-workflow/{id}, the 202 and the 200 replay."""
    if job.state is JobState.SUCCESS:
        progress = 1.0
    return {
        "content_request_id": job.content_request_id,
        "attempt": job.attempt,
        "prompt_id": job.prompt_id,
        "state": job.state.value,
        "queue_position": queue_position
        if job.state in (JobState.QUEUED, JobState.RUNNING)
        else None,
        "progress": progress,
        "image_url": job.image_urls[0] if job.image_urls else None,
        "image_urls": list(job.image_urls),
        "error_message": job.error_message,
        "error_type": job.error_type.value if job.error_type else None,
        "callback": callback.public(),
    }


def callback_body(job: Job) -> dict[str, Any]:
    """The final callback: the four contract keys exactly, then the extras of design.md."""
    success = job.state is JobState.SUCCESS
    body: dict[str, Any] = {
        "content_request_id": job.content_request_id,
        "status": "success" if success else "error",
        "image_url": job.image_urls[0] if success and job.image_urls else None,
        "error_message": None if success else (job.error_message or "failed"),
        "attempt": job.attempt,
        "prompt_id": job.prompt_id,
        "image_urls": list(job.image_urls) if success else [],
    }
    if not success:
        body["error_type"] = job.error_type.value if job.error_type else ErrorType.EXECUTION.value
        body["node_id"] = job.node_id
    body["outputs"] = [o.public() for o in job.outputs if o.url]
    body["timings"] = job.timings()
    return body
