"""Uploads with bounded retries: transient storage faults must not fail a job."""

from __future__ import annotations

from collections.abc import Sequence

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_chain, wait_fixed

from .errors import StorageError
from .storage import Storage


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
