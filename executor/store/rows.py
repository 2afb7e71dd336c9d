"""Stored rows to records and back, the same for every backend: a row is read by
column name.

SQLite's `sqlite3.Row` and psycopg's dict rows both read that way.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from ..jobs import ErrorType, Job, JobState, Output
from .base import OutboxEvent


class Row(Protocol):
    def __getitem__(self, column: str) -> Any: ...


def job_of(row: Row) -> Job:
    return Job(
        content_request_id=row["content_request_id"],
        attempt=row["attempt"],
        prompt_id=row["prompt_id"],
        instance=row["instance"] or "",  # a waiting job of a fleet has no host yet
        workflow=row["workflow"],
        fingerprint=row["fingerprint"],
        state=JobState(row["state"]),
        runs=row["runs"],
        epoch=row["epoch"],
        error_type=ErrorType(row["error_type"]) if row["error_type"] else None,
        error_message=row["error_message"],
        node_id=row["node_id"],
        image_urls=tuple(json.loads(row["image_urls"])),
        expected_images=row["expected_images"],
        cancel_requested=bool(row["cancel_requested"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        executed_at=row["executed_at"],
        finished_at=row["finished_at"],
    )


def event_of(row: Row) -> OutboxEvent:
    return OutboxEvent(
        event_id=row["event_id"],
        content_request_id=row["content_request_id"],
        attempt=row["attempt"],
        body=row["body"].encode(),
        attempts=row["attempts"],
        created_at=row["created_at"],
    )


def output_of(row: Row) -> Output:
    return Output(
        node_id=row["node_id"],
        index=row["idx"],
        key=row["key"],
        content_type=row["content_type"],
        bytes=row["bytes"],
        width=row["width"],
        height=row["height"],
        url=row["url"],
        path=row["path"],
    )


# A job's final write: "UPDATE jobs SET <FINAL_SET> WHERE prompt_id = ? AND epoch = ?"
FINAL_SET = (
    "state = {p}, error_type = {p}, error_message = {p}, node_id = {p}, image_urls = {p},"
    " finished_at = {p}, executed_at = COALESCE(executed_at, {p})"
)


def final_values(job: Job) -> tuple[Any, ...]:
    """FINAL_SET's values, then the run's prompt_id and epoch (the fencing token)."""
    return (
        job.state.value,
        job.error_type.value if job.error_type else None,
        job.error_message,
        job.node_id,
        json.dumps(job.image_urls),
        job.finished_at,
        job.executed_at,
        job.prompt_id,
        job.epoch,
    )
