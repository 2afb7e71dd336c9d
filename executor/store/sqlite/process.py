"""The journal in a child process: SQLite work that never contends for ComfyUI's GIL.

On a thread of ComfyUI's process, every SQLite call gives up the GIL and must win it back
from the busy server loop. Under load a batch of 15 admissions then waited ~4 ms for a
commit that takes ~0.1 ms alone, and the loop lost time to the hand-offs (measured: intake
req/s rose 0.50x -> 0.67x of /prompt's, on the same host and run, with this module). A
child process has a GIL of its own; the loop pays a pipe write and a read per call, and a
batch of admissions is one call.

Calls are `Journal` methods with picklable arguments, run in the order sent; answers come
back in the same order, so none needs an id. The child exits when its stdin closes, which
also happens when ComfyUI dies, so it never outlives its parent. If it dies anyway, the
calls in flight fail with `JournalUnavailable` (an sqlite3 error, so callers retry it like
a busy database), `on_lost` is told, and the next call starts a new child. Where no child
can start at all, the journal runs on a thread instead (`JournalThread`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import pickle
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from . import journal_child
from .journal_child import HEAD, JOURNAL_MODULE, PICKLE_PROTOCOL
from .thread import JournalThread, Opener

log = logging.getLogger(__name__)

T = TypeVar("T")
CLOSE_TIMEOUT = 10.0  # seconds the child gets to finish its calls and exit
_Call = tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class JournalUnavailable(sqlite3.OperationalError):
    """The journal process ended before answering: the call may or may not be written."""


class JournalProcess:
    """Runs journal calls in a child process; the same calls as `JournalThread`.

    Call as `await db(Journal.method, *args)`; `submit` queues a call now and returns
    its future. The child starts with the first call, so building a courier does no I/O.
    """

    def __init__(self, path: Path | str, on_lost: Callable[[], None] | None = None) -> None:
        self.path = str(path)
        self.on_lost = on_lost  # the child died with calls in flight
        self.fallback: JournalThread | None = None  # set when no child could start
        self._process: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._starting: asyncio.Task[None] | None = None
        self._answered = False  # by the current child: one that never answers is broken
        self._closed = False
        self._unsent: list[bytes] = []  # frames of calls made while the child starts
        self._inflight: collections.deque[_Call] = collections.deque()  # sent or unsent
        self._buffer = bytearray()

    @property
    def kind(self) -> str:
        return "process" if self.fallback is None else "thread"

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.get_pid() if self._process is not None else None

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self.submit(fn, *args, **kwargs)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Queue the call now (calls run in the order submitted); await the result later."""
        if self.fallback is not None:
            return self.fallback.submit(fn, *args, **kwargs)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._closed:
            future.set_exception(JournalUnavailable("the journal is closed"))
            return future
        try:
            data = pickle.dumps((fn, args, kwargs), PICKLE_PROTOCOL)
        except Exception as e:
            future.set_exception(e)
            return future
        frame = HEAD.pack(len(data)) + data
        self._inflight.append((future, fn, args, kwargs))
        if self._stdin is not None:
            self._stdin.write(frame)
        else:
            self._unsent.append(frame)
            if self._starting is None:
                self._starting = loop.create_task(self._start(loop))
        return future

    async def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            process, _ = await loop.subprocess_exec(
                lambda: _ChildPipes(self),
                *child_command(self.path),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=None,  # a crash's traceback joins ComfyUI's log
            )
        except Exception as e:  # no subprocess support on this loop, or no executable
            self._fall_back(f"{type(e).__name__}: {e}")
            return
        finally:
            self._starting = None
        stdin = process.get_pipe_transport(0)
        assert isinstance(stdin, asyncio.WriteTransport)
        self._process, self._stdin, self._answered = process, stdin, False
        stdin.write(b"".join(self._unsent))
        self._unsent.clear()

    def _fall_back(self, why: str) -> None:
        """Run the journal on a thread from now on, starting with the calls not yet run."""
        log.warning(
            "[courier] the journal process could not run (%s); using a thread of ComfyUI's "
            "process instead (slower intake under load)",
            why,
        )
        self.fallback = JournalThread(Opener(self.path))
        for future, fn, args, kwargs in self._inflight:
            _chain(self.fallback.submit(fn, *args, **kwargs), future)
        self._inflight.clear()
        self._unsent.clear()

    def _received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= HEAD.size:
            (size,) = HEAD.unpack_from(buffer)
            end = HEAD.size + size
            if len(buffer) < end:
                return
            frame = bytes(buffer[HEAD.size : end])
            del buffer[:end]
            self._answer(frame)

    def _answer(self, frame: bytes) -> None:
        self._answered = True
        future = self._inflight.popleft()[0]
        try:
            ok, value = pickle.loads(frame)
        except Exception as e:
            ok, value = False, JournalUnavailable(f"unreadable answer from the journal: {e!r}")
        if future.cancelled():
            return  # the caller gave up; what the call wrote stands
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _exited(self) -> None:
        process, answered = self._process, self._answered
        code = process.get_returncode() if process is not None else None
        self._process = self._stdin = None
        self._buffer.clear()
        if self._closed or not self._inflight:
            return
        if not answered:  # it died before its first answer: it cannot run here
            self._fall_back(f"it exited with code {code} before answering")
            return
        log.error("[courier] the journal process ended (exit code %s) with calls in flight", code)
        error = JournalUnavailable(f"the journal process ended (exit code {code})")
        while self._inflight:
            future = self._inflight.popleft()[0]
            if not future.done():
                future.set_exception(error)
        if self.on_lost is not None:
            self.on_lost()

    async def aclose(self) -> None:
        """Let the child answer what it was sent, close the journal, and exit."""
        self._closed = True
        if self._starting is not None:
            await asyncio.shield(self._starting)
        if self.fallback is not None:
            await self.fallback.aclose()
            return
        process, stdin = self._process, self._stdin
        if process is None or stdin is None:
            return
        stdin.close()  # EOF: the child answers what it has read, then exits
        deadline = asyncio.get_running_loop().time() + CLOSE_TIMEOUT
        while process.get_returncode() is None:
            if asyncio.get_running_loop().time() > deadline:
                log.error("[courier] the journal process did not exit; killing it")
                process.kill()
                deadline = float("inf")
            await asyncio.sleep(0.01)


class _ChildPipes(asyncio.SubprocessProtocol):
    def __init__(self, owner: JournalProcess) -> None:
        self._owner = owner

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self._owner._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        # after the exit *and* the last answer read from its pipe (process_exited may
        # come before answers still in the pipe)
        self._owner._exited()


def _chain(source: asyncio.Future[T], target: asyncio.Future[T]) -> None:
    def copy(done: asyncio.Future[T]) -> None:
        if target.done():
            return
        if done.exception() is not None:
            target.set_exception(done.exception())  # type: ignore[arg-type]
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)


def child_command(path: str) -> list[str]:
    """journal_child.py as a script, told this process's name and folder of its package."""
    journal_module = __name__.rpartition(".")[0] + ".journal"  # "<top>.executor.store..."
    top = journal_module.removesuffix("." + JOURNAL_MODULE)
    root = str(Path(__file__).resolve().parents[3])
    # -P (3.11+): the script's folder is not put first on sys.path
    isolate = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *isolate, journal_child.__file__, top, root, path]
