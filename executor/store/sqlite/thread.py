"""The journal on a thread of ComfyUI's process: the fallback when no child process can start.

`JournalProcess` (process.py) is the default: on a thread, every SQLite call gives
up the GIL and must win it back from the busy server loop (see that module).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .journal import Journal

T = TypeVar("T")


class JournalThread:
    """Runs journal calls on one dedicated thread so the event loop never waits on disk.

    The journal is opened lazily on that thread by its first call, so building a
    courier does no I/O; one thread also means one connection and a natural order of
    writes. Call as `await db(Journal.method, *args)`.
    """

    kind = "thread"

    def __init__(self, opener: Callable[[], Journal]) -> None:
        self._opener = opener
        self._journal: Journal | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="courier-journal")

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        if self._journal is None:
            self._journal = self._opener()
        return fn(self._journal, *args, **kwargs)

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self.submit(fn, *args, **kwargs)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Queue the call now (calls run in the order submitted); await the result later."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._pool, self._run, fn, args, kwargs)

    async def aclose(self) -> None:
        """Close the journal on its own thread, then stop the thread."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self) -> None:
        if self._journal is not None:
            self._pool.submit(self._journal.close).result()
            self._journal = None
        self._pool.shutdown(wait=True)


class Opener:
    """Opens the journal at `path`; a named callable for `JournalThread`'s opener."""

    def __init__(self, path: Path | str) -> None:
        self.path = path

    def __call__(self) -> Journal:
        return Journal(self.path)
