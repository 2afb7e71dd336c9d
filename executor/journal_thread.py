"""The journal's thread: journal calls from async code, and group commit of intake.

`JournalThread` keeps disk work off ComfyUI's server loop; `GroupCommit` lets concurrent
requests share one transaction on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar, overload

from .journal import Journal

log = logging.getLogger(__name__)

R = TypeVar("R")
T = TypeVar("T")
X = TypeVar("X")


class JournalThread:
    """Runs journal calls on one dedicated thread so the event loop never waits on disk.

    The journal is opened lazily on that thread by its first call, so building a
    courier does no I/O; one thread also means one connection and a natural order of
    writes. Call as `await db(Journal.method, *args)`.
    """

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

    def close(self) -> None:
        """Close the journal on its own thread, then stop the thread."""
        if self._journal is not None:
            self._pool.submit(self._journal.close).result()
            self._journal = None
        self._pool.shutdown(wait=True)


class GroupCommit(Generic[X, T]):
    """Calls made while one batch is being written go out together in the next one.

    `many` handles a list in one transaction. Under load this turns a commit per request
    into a commit per burst (the journal's cost is mostly the commit); alone, a call
    waits no longer than before. If a batch fails, its calls are retried one by one so
    one bad item fails only its own caller.

    A call's `then` runs on the loop as soon as its result is written, even if the caller
    was cancelled meanwhile: what must follow a commit cannot be lost between the two.
    """

    def __init__(
        self, db: JournalThread, many: Callable[[Journal, list[X]], list[T]], max_batch: int = 256
    ) -> None:
        self._db = db
        self._many = many
        self._max_batch = max_batch
        self._waiting: list[tuple[X, asyncio.Future[Any], Callable[[T], Any] | None]] = []
        self._writer: asyncio.Task[None] | None = None

    @overload
    async def __call__(self, item: X) -> T: ...

    @overload
    async def __call__(self, item: X, then: Callable[[T], R]) -> R: ...

    async def __call__(self, item: X, then: Callable[[T], Any] | None = None) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future, then))
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write())
        return await future

    async def _write(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                try:
                    results = await self._db(self._many, [item for item, _, _ in batch])
                except Exception as e:
                    if len(batch) == 1:
                        _fail(batch[0][1], e)
                        continue
                    for item, future, then in batch:
                        try:
                            result = (await self._db(self._many, [item]))[0]
                        except Exception as one:
                            _fail(future, one)
                            continue
                        _settle(future, then, result)
                    continue
                for (_, future, then), result in zip(batch, results, strict=True):
                    _settle(future, then, result)
        finally:
            self._writer = None


def _settle(future: asyncio.Future[Any], then: Callable[[T], Any] | None, result: T) -> None:
    try:
        value = result if then is None else then(result)
    except Exception as e:
        if future.done():  # nobody is left to raise it to
            log.error("[courier] follow-up of a journal write failed", exc_info=e)
        _fail(future, e)
        return
    _resolve(future, value)


def _resolve(future: asyncio.Future[T], result: T) -> None:
    if not future.done():  # else the caller gave up; the write stands
        future.set_result(result)


def _fail(future: asyncio.Future[T], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
