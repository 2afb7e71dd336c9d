"""How async code calls the SQLite journal: the `JournalRunner` protocol.

Two runners implement it: `JournalProcess` (the default) and `JournalThread` (the fallback).
Callers pass a `Journal` method and its arguments; arguments and results must pickle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class JournalRunner(Protocol):
    """Runs `Journal` methods off the event loop, one at a time, in the order submitted."""

    @property
    def kind(self) -> str:
        """Where the journal runs: "process" or "thread" (shown by /courier/health)."""
        ...

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]: ...

    async def aclose(self) -> None: ...
