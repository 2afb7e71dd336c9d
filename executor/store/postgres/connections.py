"""The Postgres store's connections: one writer fed in call order, a small pool for reads,
the migrations, and the instance lock.

Every write goes through one connection, one call at a time in the order the loop made
them: that is the store's ordering guarantee (an image row commits before the job's end
that was called after it). Reads take a pooled connection and may run beside the writer,
as do the writes that depend on no queued one (`beside`: admissions, claims).
Nothing connects until the first call, so building a courier does no I/O.

A call whose connection breaks may or may not have been committed: it fails with
`StoreError`, and once the writer is connected again `on_lost` is told, so the courier
rescans what it may have missed (as with the SQLite journal process).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from ...errors import StoreError
from ..base import DuplicateAttempt
from .schema import API_ROLES, MIGRATIONS, SCHEMA_VERSION, TABLES, VERSION_TABLE, quoted

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[DictRow]
Call = Callable[..., Awaitable[Any]]
CONNECT_TIMEOUT = 10  # s; libpq's connect_timeout, unless the URL sets one
READ_TIMEOUT = 5.0  # s a read waits for a pooled connection before it fails (503)
CLOSE_TIMEOUT = 10.0  # s the writer gets to finish its queue at close


class Connections:
    def __init__(self, conninfo: str, where: str, schema: str, pool_size: int = 3) -> None:
        self.conninfo = conninfo
        self.where = where  # host:port/db, for messages
        self.schema = schema
        self.pool_size = pool_size
        self.on_lost: Callable[[], None] | None = None
        self.on_failure: Callable[[], None] | None = None
        self._writer: Conn | None = None
        self._queue: collections.deque[tuple[asyncio.Future[Any], Call, tuple[Any, ...]]] = (
            collections.deque()
        )
        self._writing: asyncio.Task[None] | None = None
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._migrated = False
        self._migrating: asyncio.Lock | None = None
        self._lost = False  # a write broke mid-call: tell on_lost once connected again
        self._closed = False
        self._instance_lock: psycopg.Connection[Any] | None = None

    # -- connecting ---------------------------------------------------------------------

    async def connect(self, **kwargs: Any) -> Conn:
        """A new connection in autocommit (a transaction is opened where one is needed)."""
        try:
            return await psycopg.AsyncConnection.connect(
                self.conninfo,
                autocommit=True,
                row_factory=dict_row,
                **{"connect_timeout": CONNECT_TIMEOUT, **kwargs},
            )
        except psycopg.Error as e:
            raise StoreError(f"database {self.where}: {_first_line(e)}") from e

    async def ready(self) -> None:
        """Migrate once per process, before the first call reads or writes a table."""
        if self._migrated:
            return
        if self._migrating is None:
            self._migrating = asyncio.Lock()
        async with self._migrating:
            if self._migrated:
                return
            conn = await self.connect()
            try:
                await migrate(conn, self.schema)
            except psycopg.Error as e:
                raise StoreError(f"database {self.where}: migration failed: {e}") from e
            finally:
                await conn.close()
            self._migrated = True

    # -- writes: one connection, in call order ------------------------------------------

    def submit(self, fn: Callable[..., Awaitable[T]], *args: Any) -> asyncio.Future[T]:
        """Queue `fn(conn, *args)` now; it runs after every write queued before it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._closed:
            future.set_exception(StoreError("the store is closed"))
            return future
        self._queue.append((future, fn, args))
        if self._writing is None or self._writing.done():
            self._writing = loop.create_task(self._write_queue())
        return future

    async def _write_queue(self) -> None:
        while self._queue:
            future, fn, args = self._queue.popleft()
            try:
                conn = await self._writer_connection()
                result = await fn(conn, *args)
            except DuplicateAttempt as e:
                _fail(future, e)
            except StoreError as e:
                self._failed()
                _fail(future, e)
            except psycopg.Error as e:
                if self._writer is not None and (self._writer.broken or self._writer.closed):
                    self._lost = True  # the call may have been committed before the break
                    await self._drop_writer()
                self._failed()
                _fail(future, StoreError(f"database {self.where}: {_first_line(e)}"))
            except Exception as e:  # a bug: the caller gets it, later writes go on
                _fail(future, e)
            else:
                if not future.done():  # else the caller gave up; the write stands
                    future.set_result(result)

    def _failed(self) -> None:
        """A write failed (committed or not): `on_failure` has the deliverer look again."""
        if self.on_failure is not None:
            asyncio.get_running_loop().call_soon(self.on_failure)

    async def _writer_connection(self) -> Conn:
        if self._writer is not None and not (self._writer.closed or self._writer.broken):
            return self._writer
        await self._drop_writer()
        await self.ready()
        self._writer = await self.connect()
        if self._lost:
            self._lost = False
            log.warning("[courier] database %s is back; rescanning unconfirmed work", self.where)
            if self.on_lost is not None:
                asyncio.get_running_loop().call_soon(self.on_lost)
        return self._writer

    async def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                await writer.close()
            except psycopg.Error:
                pass

    # -- reads: a pooled connection -----------------------------------------------------

    async def read(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`fn(conn, *args)` on a pooled connection. A read on a connection found broken
        (idle ones the server closed while it restarted) is tried again on another; the
        pool discards the broken one."""
        await self.ready()
        pool = await self._read_pool()
        tries = self.pool_size + 1
        while True:
            tries -= 1
            try:
                async with pool.connection() as conn:
                    try:
                        return await fn(conn, *args)
                    except psycopg.OperationalError:
                        if tries and conn.broken:
                            continue
                        raise
            except psycopg.Error as e:
                raise StoreError(f"database {self.where}: {_first_line(e)}") from e

    async def beside(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """A write that need not wait for the writer's queue (a claim touches only rows no
        queued write does), on a pooled connection. Never retried: a connection that broke
        mid-call may have committed it, so `on_lost` is told to rescan instead."""
        await self.ready()
        pool = await self._read_pool()
        try:
            async with pool.connection() as conn:
                try:
                    return await fn(conn, *args)
                except psycopg.OperationalError:
                    if conn.broken and self.on_lost is not None:
                        asyncio.get_running_loop().call_soon(self.on_lost)
                    raise
        except psycopg.Error as e:
            raise StoreError(f"database {self.where}: {_first_line(e)}") from e

    async def _read_pool(self) -> AsyncConnectionPool[Conn]:
        if self._pool is None:
            pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
                self.conninfo,
                kwargs={
                    "autocommit": True,
                    "row_factory": dict_row,
                    "connect_timeout": CONNECT_TIMEOUT,
                },
                min_size=1,
                max_size=self.pool_size,
                open=False,
                timeout=READ_TIMEOUT,
                name="courier-read",
                reconnect_timeout=3600.0,
            )
            self._pool = pool
            await pool.open(wait=False)
        return self._pool

    # -- the instance lock --------------------------------------------------------------

    def lock_instance(self, name: str) -> bool:
        """A session advisory lock on a connection of its own, held while the process
        lives (the server releases it when the connection ends, however the process
        died). Blocking: called on a thread."""
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        except psycopg.Error as e:
            raise StoreError(f"database {self.where}: {_first_line(e)}") from e
        try:  # a process standing by for its name tries again every heartbeat: never leak
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                (f"comfy-courier instance {self.schema} {name}",),
            ).fetchone()
        except psycopg.Error as e:
            conn.close()
            raise StoreError(f"database {self.where}: {_first_line(e)}") from e
        if not (row and row[0]):
            conn.close()
            return False
        self.unlock_instance()
        self._instance_lock = conn
        return True

    def unlock_instance(self) -> None:
        lock, self._instance_lock = self._instance_lock, None
        if lock is not None:
            # Unlocked before the session closes: the server ends a closed session's
            # backend (and drops its locks) a moment later, and a successor starting at
            # once would find the name still held. A dead process's lock goes that way.
            with contextlib.suppress(Exception):
                lock.execute("SELECT pg_advisory_unlock_all()")
            lock.close()

    async def aclose(self) -> None:
        self._closed = True
        if self._writing is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writing), CLOSE_TIMEOUT)
            except asyncio.TimeoutError:
                log.error("[courier] database writes still queued at close: dropped")
                self._writing.cancel()
        await self._drop_writer()
        if self._pool is not None:
            await self._pool.close()
        self.unlock_instance()


class Rows:
    """Statement helpers of the store and its mixins (outbox.py, fleet.py)."""

    db: Connections
    channel: str  # the fleet's LISTEN/NOTIFY channel
    _s: str  # the quoted schema name

    async def _one(self, conn: Conn, sql: str, *params: Any) -> dict[str, Any] | None:
        cur = await conn.execute(sql, params)
        return await cur.fetchone()

    async def _all(self, conn: Conn, sql: str, *params: Any) -> list[dict[str, Any]]:
        cur = await conn.execute(sql, params)
        return await cur.fetchall()

    async def _count(self, conn: Conn, sql: str, *params: Any) -> int:
        cur = await conn.execute(sql, params)
        return cur.rowcount

    async def _write(self, sql: str, *params: Any) -> int:
        """One statement through the writer: its row count."""
        return int(await self.db.submit(self._count, sql, *params))


async def migrate(conn: Conn, schema: str) -> None:
    """Create or upgrade the schema to SCHEMA_VERSION; several hosts may run it at once."""
    s = quoted(schema)
    if await _version(conn, schema) == SCHEMA_VERSION:
        return  # the usual start: no lock taken
    async with conn.transaction():
        # Hosts starting together wait here for the first one's transaction.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"comfy-courier migrations {schema}",),
        )
        exists = await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if await exists.fetchone() is None:  # an existing schema needs no CREATE right
            await conn.execute(f"CREATE SCHEMA {s}")
        for statement in VERSION_TABLE.format(s=s).split(";"):
            if statement.strip():
                await conn.execute(statement)
        current = await _version(conn, schema) or 0
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"schema {schema} is at version {current}, newer than this comfy-courier "
                f"({SCHEMA_VERSION}); upgrade comfy-courier on this host"
            )
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            for statement in statements.format(s=s).split(";\n"):
                if statement.strip():
                    await conn.execute(statement)
        await conn.execute(f"DELETE FROM {s}.schema_version")
        await conn.execute(
            f"INSERT INTO {s}.schema_version (version) VALUES (%s)", (SCHEMA_VERSION,)
        )
        roles = await conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (list(API_ROLES),)
        )
        for row in await roles.fetchall():
            # Supabase's API roles: no grant of ours, whatever default privileges say
            for table in TABLES:
                await conn.execute(f'REVOKE ALL ON {s}.{table} FROM "{row["rolname"]}"')
    log.info(
        "[courier] database schema %s migrated from version %s to %s",
        schema,
        current,
        SCHEMA_VERSION,
    )


async def _version(conn: Conn, schema: str) -> int | None:
    found = await conn.execute("SELECT to_regclass(%s) AS t", (f"{quoted(schema)}.schema_version",))
    row = await found.fetchone()
    if row is None or row["t"] is None:
        return None
    cur = await conn.execute(f"SELECT max(version) AS v FROM {quoted(schema)}.schema_version")
    got = await cur.fetchone()
    return int(got["v"]) if got and got["v"] is not None else None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
