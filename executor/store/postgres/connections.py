"""The Postgres store's connections: one writer fed in call order (writer.py), a small
pool for reads, the migrations, and the instance lock.

Every write goes through one connection in the order the loop made the calls: that is
the store's ordering guarantee (an image row commits before the job's end that was called
after it). Reads take a pooled connection and may run beside the writer, as do the writes
that depend on no queued one (`beside`: admissions, claims).
Nothing connects until the first call, so building a courier does no I/O.

A call whose connection breaks may or may not have been committed: it fails with
`StoreError`, and once the writer is connected again `on_lost` is told, so the courier
rescans what it may have missed (as with the SQLite journal process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from ...errors import StoreError
from .schema import API_ROLES, FINAL, MIGRATIONS, SCHEMA_VERSION, TABLES, VERSION_TABLE, quoted
from .writer import Answer, Conn, Writer, all_rows, first_line, first_row, rowcount

log = logging.getLogger(__name__)

T = TypeVar("T")
CONNECT_TIMEOUT = 10  # s; libpq's connect_timeout, unless the URL sets one
READ_TIMEOUT = 5.0  # s a read waits for a pooled connection before it fails (503)


class Connections:
    def __init__(self, conninfo: str, where: str, schema: str, pool_size: int = 3) -> None:
        self.conninfo = conninfo
        self.where = where  # host:port/db, for messages
        self.schema = schema
        self.pool_size = pool_size
        self.writer = Writer(self._connect_writer, where)
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._migrated = False
        self._migrating: asyncio.Lock | None = None
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
            raise StoreError(f"database {self.where}: {first_line(e)}") from e

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

    # -- writes: one connection, in call order (writer.py) -----------------------------

    @property
    def on_lost(self) -> Callable[[], None] | None:
        return self.writer.on_lost

    @on_lost.setter
    def on_lost(self, callback: Callable[[], None] | None) -> None:
        self.writer.on_lost = callback

    @property
    def on_failure(self) -> Callable[[], None] | None:
        return self.writer.on_failure

    @on_failure.setter
    def on_failure(self, callback: Callable[[], None] | None) -> None:
        self.writer.on_failure = callback

    def submit(self, fn: Callable[..., Awaitable[T]], *args: Any) -> asyncio.Future[T]:
        """Queue `fn(conn, *args)` now (a write of several statements); it runs alone,
        after every write queued before it."""
        return self.writer.call(fn, *args)

    def statement(self, sql: str, params: tuple[Any, ...], answer: Answer) -> asyncio.Future[Any]:
        """Queue one statement now, in order with every other write; it may share a round
        trip with the statements queued beside it."""
        return self.writer.statement(sql, params, answer)

    async def _connect_writer(self) -> Conn:
        await self.ready()
        return await self.connect()

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
                raise StoreError(f"database {self.where}: {first_line(e)}") from e

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
            raise StoreError(f"database {self.where}: {first_line(e)}") from e

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
            raise StoreError(f"database {self.where}: {first_line(e)}") from e
        try:  # a process standing by for its name tries again every heartbeat: never leak
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                (f"comfy-courier instance {self.schema} {name}",),
            ).fetchone()
        except psycopg.Error as e:
            conn.close()
            raise StoreError(f"database {self.where}: {first_line(e)}") from e
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
        await self.writer.aclose()
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
        return int(await self.db.statement(sql, params, rowcount))

    def _write_one(self, sql: str, *params: Any) -> asyncio.Future[dict[str, Any] | None]:
        """One statement through the writer, queued now: its first row."""
        return self.db.statement(sql, params, first_row)

    def _write_all(self, sql: str, *params: Any) -> asyncio.Future[list[dict[str, Any]]]:
        """One statement through the writer, queued now: its rows."""
        return self.db.statement(sql, params, all_rows)

    async def _requeue(
        self, conn: Conn, old: str, new: str, runs: int, *, to_fleet: bool = False
    ) -> int | None:
        """A job queued again under a new prompt_id and a raised epoch (the old run is
        fenced), its images dropped (the next run records them again); with `to_fleet`,
        in the fleet's line for any host (NOTIFY at commit). The new epoch, or None if
        the job ended meanwhile."""
        s = self._s
        host = " instance = NULL," if to_fleet else ""
        async with conn.transaction():
            row = await self._one(
                conn,
                f"UPDATE {s}.jobs SET prompt_id = %s,{host} runs = runs + %s, state = 'queued',"
                " epoch = epoch + 1, started_at = NULL, executed_at = NULL,"
                f" expected_images = NULL WHERE prompt_id = %s AND state NOT IN {FINAL}"
                " RETURNING content_request_id, attempt, epoch",
                new,
                runs,
                old,
            )
            if row is None:
                return None
            await conn.execute(
                f"DELETE FROM {s}.images WHERE content_request_id = %s AND attempt = %s",
                (row["content_request_id"], row["attempt"]),
            )
            if to_fleet:
                await conn.execute("SELECT pg_notify(%s, 'job')", (self.channel,))
        return int(row["epoch"])


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
