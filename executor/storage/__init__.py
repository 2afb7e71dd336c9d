"""Where delivered images go: a small protocol, one backend per module."""

from __future__ import annotations

from typing import Protocol


class Storage(Protocol):
    """Stores one object and answers the URL the callback will carry.

    `put` must be idempotent for the same key (retries and restarts upload again), and
    raise `StorageError(retryable=...)` on failure.
    """

    kind: str

    async def put(self, key: str, data: bytes, content_type: str) -> str: ...
