"""Where delivered images go: a small protocol, one backend per module."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Storage(Protocol):
    """Stores one object and answers the URL the callback will carry.

    `put` must be idempotent for the same key (retries and restarts upload again), and
    raise `StorageError(retryable=...)` on failure.
    """

    kind: str

    async def put(self, key: str, data: bytes, content_type: str) -> str: ...

    def url_of_file(self, path: Path) -> str | None:
        """A URL for a file ComfyUI already wrote, where this storage can serve it as it
        is (local storage: the node's own file through /view); None to upload a copy."""
        ...
