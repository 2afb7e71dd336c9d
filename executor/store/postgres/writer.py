"""The Postgres store's writer: one connection, fed in call order, the queued writes of a
burst sent in one round trip.

Every write goes through this one connection in the order the loop made the calls: that
is the store's ordering guarantee (an image row commits before the job's end that was
called after it). With the database 10–50 ms away each round trip is latency on a job's
path, so writes that are one statement (most are: `statement`) do not wait for each
other's answers: the statements queued when the connection is free go out together in
pipeline mode, each in a transaction of its own (BEGIN, the statement, COMMIT), and the
server runs them in that order. A caller is answered only once its COMMIT is confirmed.

If a statement of a burst fails, the server skips everything after it in the burst: the
failed call gets `StoreError`, the calls before it are committed and answered, the calls
after it were never run and go out again first, so every call sees what a one-by-one
writer would have given it. If the connection breaks, every call of the burst whose
COMMIT was not confirmed gets `StoreError` (it may or may not have been written; each is
whole or absent, never half), and once the writer is connected again `on_lost` is told,
so the courier rescans what it may have missed. Writes of several statements (`call`)
run alone, between bursts.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg.rows import DictRow

from ...errors import StoreError
from ..base import DuplicateAttempt

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[DictRow]
Cursor = psycopg.AsyncCursor[DictRow]
Answer = Callable[[Cursor], Awaitable[Any]]
MAX_BURST = 64  # statements sent in one round trip at most
# Before statements go out, the writer waits this share of a round trip (at most
# LINGER_MAX) for the writes that follow at once: a job's end is queued a millisecond
# after its image's row, and riding along saves it a whole round trip (on loopback, with
# its round trip of a fraction of a millisecond, the wait is next to nothing).
LINGER_SHARE = 0.15
LINGER_MAX = 0.003  # s
CLOSE_TIMEOUT = 10.0  # s the writer gets to finish its queue at close


async def rowcount(cur: Cursor) -> int:
    return cur.rowcount


async def first_row(cur: Cursor) -> dict[str, Any] | None:
    return await cur.fetchone()


async def all_rows(cur: Cursor) -> list[dict[str, Any]]:
    return await cur.fetchall()


@dataclass
class _Write:
    future: asyncio.Future[Any]
    fn: Callable[..., Awaitable[Any]] | None  # a call of several statements, run alone
    args: tuple[Any, ...] = ()
    sql: str = ""  # or one statement, which may share a burst
    answer: Answer = rowcount


class Writer:
    """The ordered writes of one store. `connect()` opens a connection (migrated, in
    autocommit); `where` names the database in messages."""

    def __init__(self, connect: Callable[[], Awaitable[Conn]], where: str) -> None:
        self._connect = connect
        self.where = where
        self.on_lost: Callable[[], None] | None = None
        self.on_failure: Callable[[], None] | None = None
        self.conn: Conn | None = None
        self.lost = False  # a write broke mid-call: tell on_lost once connected again
        self.bursts = 0  # round trips that carried more than one statement
        self.round_trip = 0.0  # s, a moving average of a statement's answer time
        self._queue: collections.deque[_Write] = collections.deque()
        self._writing: asyncio.Task[None] | None = None
        self._closed = False

    # -- queueing -------------------------------------------------------------------------

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> asyncio.Future[T]:
        """Queue `fn(conn, *args)` now (a write of several statements, in a transaction of
        its own); it runs alone, after every write queued before it."""
        return self._put(fn, args, "", rowcount)

    def statement(self, sql: str, params: tuple[Any, ...], answer: Answer) -> asyncio.Future[Any]:
        """Queue one statement now, its own transaction; the future: `answer(cursor)`."""
        return self._put(None, params, sql, answer)

    def _put(
        self, fn: Callable[..., Awaitable[Any]] | None, args: tuple[Any, ...], sql: str,
        answer: Answer,
    ) -> asyncio.Future[Any]:  # fmt: skip
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(StoreError("the store is closed"))
            return future
        self._queue.append(_Write(future, fn, args, sql, answer))
        if self._writing is None or self._writing.done():
            self._writing = loop.create_task(self._write_queue())
        return future

    async def _write_queue(self) -> None:
        while self._queue:
            if len(self._queue) == 1 and self._queue[0].fn is None and self.round_trip > 0:
                # one statement, just queued: the writes that follow at once may join it
                await asyncio.sleep(min(LINGER_MAX, LINGER_SHARE * self.round_trip))
            burst = [self._queue.popleft()]
            if burst[0].fn is None:
                while self._queue and self._queue[0].fn is None and len(burst) < MAX_BURST:
                    burst.append(self._queue.popleft())
            started = time.monotonic()
            if len(burst) == 1 or not psycopg.AsyncPipeline.is_supported():
                for write in burst:
                    await self._alone(write)
            else:
                await self._burst(burst)
            if burst[0].fn is None and len(burst) == 1 and self.conn is not None:
                self._timed(time.monotonic() - started)

    def _timed(self, took: float) -> None:
        """A statement alone took `took` s to be answered: about one round trip."""
        self.round_trip = 0.8 * self.round_trip + 0.2 * took if self.round_trip else took

    # -- one write alone ------------------------------------------------------------------

    async def _alone(self, write: _Write) -> None:
        future = write.future
        try:
            conn = await self._connection()
            if write.fn is not None:
                result = await write.fn(conn, *write.args)
            else:
                result = await write.answer(await conn.execute(write.sql, write.args))
        except DuplicateAttempt as e:
            _fail(future, e)
        except StoreError as e:
            self._failed()
            _fail(future, e)
        except psycopg.Error as e:
            if self.conn is not None and (self.conn.broken or self.conn.closed):
                self.lost = True  # the call may have been committed before the break
                await self.drop()
            self._failed()
            _fail(future, StoreError(f"database {self.where}: {first_line(e)}"))
        except Exception as e:  # a bug: the caller gets it, later writes go on
            _fail(future, e)
        else:
            if not future.done():  # else the caller gave up; the write stands
                future.set_result(result)

    # -- statements in one round trip ----------------------------------------------------

    async def _burst(self, burst: list[_Write]) -> None:
        try:
            conn = await self._connection()
        except StoreError as e:
            for write in burst:
                self._failed()
                _fail(write.future, e)
            return
        self.bursts += 1
        # (write, its statement's cursor, its COMMIT's cursor, an error of its own)
        sent: list[tuple[_Write, Cursor, Cursor, list[BaseException]]] = []
        error: psycopg.Error | None = None  # the server's answer to the failed statement
        broken = False
        try:
            async with conn.pipeline():
                for write in burst:
                    begin, cur, commit = conn.cursor(), conn.cursor(), conn.cursor()
                    own: list[BaseException] = []
                    sent.append((write, cur, commit, own))  # in flight from here on
                    for c, sql, params in ((begin, "BEGIN", None), (cur, write.sql, write.args),
                                           (commit, "COMMIT", None)):  # fmt: skip
                        try:
                            await c.execute(sql, params)
                        except psycopg.Error as e:
                            if conn.broken or conn.closed:
                                raise
                            if _from_server(e):  # an answer to an earlier statement
                                error = error or e
                            else:  # this statement could not be sent (a bug)
                                own.append(e)
        except psycopg.Error as e:
            if not (conn.broken or conn.closed) and _from_server(e):
                error = error or e
            else:
                broken = True
        except Exception as e:  # a bug: what the pipeline holds cannot be trusted
            log.exception("[courier] a pipelined database write failed unexpectedly: %s", e)
            broken = True
        if broken:
            self.lost = True
            await self.drop()
        elif error is not None:
            await self._end_failed_transaction(conn)
        answered = len(sent)
        failed = False
        again: list[_Write] = []
        for write, cur, commit, own in sent:
            if _committed(cur, commit):
                try:
                    result = await write.answer(cur)
                except Exception as e:  # a bug in reading the answer: the write stands
                    _fail(write.future, e)
                else:
                    if not write.future.done():
                        write.future.set_result(result)
            elif own:
                self._failed()
                _fail(write.future, StoreError(f"database {self.where}: {first_line(own[0])}"))
            elif broken:
                self._failed()
                _fail(write.future, StoreError(f"database {self.where}: connection lost"))
            elif not failed:  # the first statement the server refused
                failed = True
                self._failed()
                why = first_line(error) if error is not None else "refused in a pipeline"
                _fail(write.future, StoreError(f"database {self.where}: {why}"))
            else:  # skipped by the server after that one: never run, so sent again
                again.append(write)
        again.extend(burst[answered:])  # never sent: the connection broke before them
        self._queue.extendleft(reversed(again))

    async def _end_failed_transaction(self, conn: Conn) -> None:
        """A statement failed in its transaction, whose COMMIT the server then skipped: the
        burst's end (a Sync) does not close it, so it is rolled back before the next."""
        try:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                await conn.execute("ROLLBACK")
        except psycopg.Error as e:
            log.warning("[courier] database %s: rolling back failed: %s", self.where, e)
            self.lost = True
            await self.drop()

    async def _connection(self) -> Conn:
        if self.conn is not None and not (self.conn.closed or self.conn.broken):
            return self.conn
        await self.drop()
        self.conn = await self._connect()
        if self.lost:
            self.lost = False
            log.warning("[courier] database %s is back; rescanning unconfirmed work", self.where)
            if self.on_lost is not None:
                asyncio.get_running_loop().call_soon(self.on_lost)
        return self.conn

    def _failed(self) -> None:
        """A write failed (committed or not): `on_failure` has the deliverer look again."""
        if self.on_failure is not None:
            asyncio.get_running_loop().call_soon(self.on_failure)

    async def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                await conn.close()
            except psycopg.Error:
                pass

    async def aclose(self) -> None:
        self._closed = True
        if self._writing is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writing), CLOSE_TIMEOUT)
            except asyncio.TimeoutError:
                log.error("[courier] database writes still queued at close: dropped")
                self._writing.cancel()
        await self.drop()


def _committed(cur: Cursor, commit: Cursor) -> bool:
    """The statement ran and its transaction's COMMIT was confirmed by the server."""
    return (
        cur.pgresult is not None
        and commit.pgresult is not None
        and (commit.statusmessage == "COMMIT")
    )


def _from_server(error: psycopg.Error) -> bool:
    """An error the server answered a statement with (or the skip that follows one)."""
    return isinstance(error, psycopg.errors.PipelineAborted) or error.sqlstate is not None


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
