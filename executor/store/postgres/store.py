"""The Postgres store: the `Store` of several hosts sharing one database.

Same guarantees as the SQLite journal: each method is one transaction (most are one
statement), committed before it returns; a job's final state and its outbox event are
written by one statement, once per attempt; writes are applied in call order (one
writer connection, `connections.py`); admissions share transactions (group commit).

Where hosts share the rows, a few methods mean more than on one host:
- `admit` serialises requests for one id across hosts with a transaction-level advisory
  lock per id, so two hosts never both accept an attempt;
- `due_events` leases the events it returns to the asking host (any live host delivers
  any due callback; the lease expires, so a dead host's events go out elsewhere), and
  `finish` leases a new event to the host that finished it, which sends it at once;
- `adopt_stale` hands a silent host's jobs to the adopter without their upload records'
  promise: the files were on the other host, so those runs are run again, not resumed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from ...jobs import CallbackSummary, Job, JobState, Output
from ..base import OutboxEvent
from ..group_commit import GroupCommit
from . import dsn
from .connections import Conn, Connections
from .schema import JOB_COLUMNS, event_of, job_of, job_values, output_of, quoted

R = TypeVar("R")

LEASE = 120.0  # s an event stays with the host that took it before another may send it
FINAL = "('success', 'error')"
# set_state's fields, and how each is stored
STATE_FIELDS = {"started_at", "executed_at", "expected_images", "cancel_requested"}


class PostgresStore:
    kind = "postgres"
    shared = True  # hosts share the jobs: a job may wait for any host to claim it

    def __init__(self, url: str, schema: str = "courier", pool_size: int = 2) -> None:
        self.schema = schema
        self.channel = f"comfy_courier_{schema}"
        self.db = Connections(dsn.prepare(url), dsn.describe(url), schema, pool_size)
        self._s = s = quoted(schema)
        self._admit: GroupCommit[Job, Job | int] = GroupCommit(self.db.submit, self._admit_many)
        self._latest_sql = (
            f"SELECT DISTINCT ON (content_request_id) * FROM {s}.jobs"
            " WHERE content_request_id = ANY(%s) ORDER BY content_request_id, attempt DESC"
        )

    @property
    def on_lost(self) -> Callable[[], None] | None:
        return self.db.on_lost

    @on_lost.setter
    def on_lost(self, callback: Callable[[], None] | None) -> None:
        self.db.on_lost = callback

    @property
    def on_failure(self) -> Callable[[], None] | None:
        return self.db.on_failure

    @on_failure.setter
    def on_failure(self, callback: Callable[[], None] | None) -> None:
        self.db.on_failure = callback

    def claim_instance(self, name: str) -> bool:
        return self.db.lock_instance(name)

    def release_instance(self) -> None:
        self.db.unlock_instance()

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

    # -- jobs ---------------------------------------------------------------------------

    async def admit(
        self, job: Job, then: Callable[[Job | int], R], after: Callable[[R], None]
    ) -> R:
        return await self._admit(job, then, after)

    async def _admit_many(self, conn: Conn, jobs: list[Job]) -> list[Job | int]:
        """The duplicate rule and the inserts of a lot, in one transaction (journal.admit).

        Each id's advisory lock (taken in sorted order: no deadlock between hosts) makes a
        concurrent request for the same id on another host wait and then see this one.
        A job with no instance waits for a host to claim it; the hosts are told.
        """
        s = self._s
        async with conn.transaction():
            ids = sorted({job.content_request_id for job in jobs})
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(id)) FROM unnest(%s::text[])"
                " AS id",
                (self.schema, ids),
            )
            latest = {
                r["content_request_id"]: job_of(r)
                for r in await self._all(conn, self._latest_sql, ids)
            }
            results: list[Job | int] = []
            accepted: list[Job] = []
            for job in jobs:
                prior = latest.get(job.content_request_id)
                if prior is not None and prior.blocks(job.fingerprint):
                    results.append(prior)
                    continue
                row = replace(job, attempt=prior.attempt + 1 if prior is not None else 1)
                latest[job.content_request_id] = row  # a later job of the lot sees this one
                accepted.append(row)
                results.append(row.attempt)
            if accepted:
                async with conn.cursor() as cur:
                    await cur.executemany(
                        f"INSERT INTO {s}.jobs ({JOB_COLUMNS}) VALUES"
                        " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        [job_values(job) for job in accepted],
                    )
                    later = [j for j in accepted if j.attempt > 1]
                    if later:
                        await cur.executemany(
                            f"UPDATE {s}.outbox SET state = 'dropped', updated_at = %s"
                            " WHERE content_request_id = %s AND attempt < %s AND state = 'pending'",
                            [(j.created_at, j.content_request_id, j.attempt) for j in later],
                        )
                if any(not job.instance for job in accepted):
                    await conn.execute("SELECT pg_notify(%s, 'job')", (self.channel,))
            return results

    async def latest(self, content_request_id: str) -> Job | None:
        row = await self.db.read(self._one, self._latest_sql, [content_request_id])
        return job_of(row) if row else None

    async def count_unfinished(self) -> int:
        row = await self.db.read(
            self._one, f"SELECT count(*) AS n FROM {self._s}.jobs WHERE state NOT IN {FINAL}"
        )
        return int(row["n"]) if row else 0

    async def unfinished(self, instance: str) -> list[Job]:
        rows = await self.db.read(
            self._all,
            f"SELECT * FROM {self._s}.jobs WHERE instance = %s AND state NOT IN {FINAL}"
            " ORDER BY created_at",
            instance,
        )
        return [job_of(r) for r in rows]

    async def set_state(
        self, prompt_id: str, state: JobState, *, epoch: int | None = None, **fields: Any
    ) -> bool:
        assert not state.final, "final states go through finish()"
        assert set(fields) <= STATE_FIELDS, fields
        if "cancel_requested" in fields:
            fields["cancel_requested"] = bool(fields["cancel_requested"])
        columns = {"state": state.value, **fields}
        sets = ", ".join(f"{name} = %s" for name in columns)
        fence = "" if epoch is None else " AND epoch = %s"
        return 1 == await self._write(
            f"UPDATE {self._s}.jobs SET {sets} WHERE prompt_id = %s{fence}"
            f" AND state NOT IN {FINAL}",
            *columns.values(),
            prompt_id,
            *(() if epoch is None else (epoch,)),
        )

    async def request_cancel(self, content_request_id: str, attempt: int) -> bool:
        """Flag a queued or running attempt; its host is told at once (NOTIFY)."""
        row = await self.db.submit(
            self._one,
            f"WITH flagged AS (UPDATE {self._s}.jobs SET cancel_requested = true"
            " WHERE content_request_id = %s AND attempt = %s AND state IN ('queued', 'running')"
            " RETURNING instance)"
            " SELECT count(*) AS n, max(pg_notify(%s, 'cancel ' || instance)::text) AS told"
            " FROM flagged",
            content_request_id,
            attempt,
            self.channel,
        )
        return bool(row and row["n"] == 1)

    async def cancel_requests(self, instance: str) -> list[str]:
        rows = await self.db.read(
            self._all,
            f"SELECT prompt_id FROM {self._s}.jobs WHERE instance = %s AND cancel_requested"
            f" AND state NOT IN {FINAL}",
            instance,
        )
        return [r["prompt_id"] for r in rows]

    async def resubmitted(
        self, old_prompt_id: str, new_prompt_id: str, now: float, *, count_run: bool
    ) -> int | None:
        return await self.db.submit(self._resubmitted, old_prompt_id, new_prompt_id, count_run)

    async def _resubmitted(self, conn: Conn, old: str, new: str, count_run: bool) -> int | None:
        s = self._s
        async with conn.transaction():
            row = await self._one(
                conn,
                f"UPDATE {s}.jobs SET prompt_id = %s, runs = runs + %s, state = 'queued',"
                " epoch = epoch + 1, started_at = NULL, executed_at = NULL,"
                f" expected_images = NULL WHERE prompt_id = %s AND state NOT IN {FINAL}"
                " RETURNING content_request_id, attempt, epoch",
                new,
                int(count_run),
                old,
            )
            if row is None:
                return None
            await conn.execute(
                f"DELETE FROM {s}.images WHERE content_request_id = %s AND attempt = %s",
                (row["content_request_id"], row["attempt"]),
            )
        return int(row["epoch"])

    async def reclaim(self, prompt_id: str, epoch: int) -> int | None:
        changed = await self._write(
            f"UPDATE {self._s}.jobs SET epoch = epoch + 1 WHERE prompt_id = %s AND epoch = %s"
            f" AND state NOT IN {FINAL}",
            prompt_id,
            epoch,
        )
        return epoch + 1 if changed == 1 else None

    async def fenced(self, instance: str, runs: list[tuple[str, int]]) -> list[str]:
        if not runs:
            return []
        rows = await self.db.read(
            self._all,
            "SELECT r.prompt_id FROM unnest(%s::text[], %s::int[]) AS r(prompt_id, epoch)"
            f" WHERE NOT EXISTS (SELECT 1 FROM {self._s}.jobs j WHERE j.prompt_id = r.prompt_id"
            f" AND j.epoch = r.epoch AND j.instance = %s AND j.state NOT IN {FINAL})",
            [p for p, _ in runs],
            [e for _, e in runs],
            instance,
        )
        return [r["prompt_id"] for r in rows]

    async def finish(self, job: Job, event: OutboxEvent | None) -> bool:
        """The final state and its event in one statement, leased to the finishing host."""
        assert job.state.final
        s = self._s
        update = (
            f"UPDATE {s}.jobs SET state = %s, error_type = %s, error_message = %s, node_id = %s,"
            " image_urls = %s, finished_at = %s, executed_at = COALESCE(executed_at, %s)"
            f" WHERE prompt_id = %s AND epoch = %s AND state NOT IN {FINAL} RETURNING 1"
        )
        params: list[Any] = [
            job.state.value,
            job.error_type.value if job.error_type else None,
            job.error_message,
            job.node_id,
            json.dumps(job.image_urls),
            job.finished_at,
            job.executed_at,
            job.prompt_id,
            job.epoch,
        ]
        if event is None:
            return 1 == await self._write(update, *params)
        at = event.created_at
        params += [
            event.event_id,
            event.content_request_id,
            event.attempt,
            job.instance,
            at + LEASE,
            event.body.decode(),
            at,
            at,
            at,
        ]
        row = await self.db.submit(
            self._one,
            f"WITH done AS ({update}), event AS (INSERT INTO {s}.outbox (event_id,"
            " content_request_id, attempt, instance, lease_until, body, state, next_attempt_at,"
            " created_at, updated_at) SELECT %s, %s, %s, %s, %s, %s, 'pending', %s, %s, %s"
            " FROM done RETURNING 1) SELECT count(*) AS n FROM event",
            *params,
        )
        return bool(row and row["n"] == 1)

    async def prune(self, finished_before: float, limit: int) -> int:
        return await self.db.submit(self._prune, finished_before, limit)

    async def _prune(self, conn: Conn, finished_before: float, limit: int) -> int:
        """journal.prune: slim final attempts to their outcome, oldest first."""
        s = self._s
        async with conn.transaction():
            rows = await self._all(
                conn,
                f"SELECT content_request_id, attempt FROM {s}.jobs j"
                f" WHERE state IN {FINAL} AND workflow <> '' AND finished_at < %s"
                f" AND NOT EXISTS (SELECT 1 FROM {s}.outbox o WHERE o.content_request_id ="
                " j.content_request_id AND o.attempt = j.attempt AND o.state = 'pending')"
                " ORDER BY finished_at LIMIT %s FOR UPDATE SKIP LOCKED",
                finished_before,
                limit,
            )
            if not rows:
                return 0
            keys = ([r["content_request_id"] for r in rows], [r["attempt"] for r in rows])
            pruned = "unnest(%s::text[], %s::int[]) AS k(cid, attempt)"
            for table in ("images", "outbox"):
                await conn.execute(
                    f"DELETE FROM {s}.{table} t USING {pruned}"
                    " WHERE t.content_request_id = k.cid AND t.attempt <= k.attempt",
                    keys,
                )
            await conn.execute(
                f"DELETE FROM {s}.jobs t USING {pruned} WHERE t.content_request_id = k.cid"
                f" AND (t.attempt < k.attempt OR (t.attempt = k.attempt AND t.attempt <"
                f" (SELECT max(attempt) FROM {s}.jobs m WHERE m.content_request_id = k.cid)))",
                keys,
            )
            await conn.execute(
                f"UPDATE {s}.jobs t SET workflow = '' FROM {pruned}"
                " WHERE t.content_request_id = k.cid AND t.attempt = k.attempt",
                keys,
            )
        return len(rows)

    # -- images -------------------------------------------------------------------------

    def record_image(self, job: Job, seq: int, output: Output) -> asyncio.Future[bool]:
        s = self._s
        return self.db.submit(
            self._count_is_one,
            f"INSERT INTO {s}.images (content_request_id, attempt, seq, node_id, idx, key, path,"
            " content_type, bytes, width, height, url)"
            " SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s WHERE EXISTS (SELECT 1 FROM"
            f" {s}.jobs WHERE content_request_id = %s AND attempt = %s AND epoch = %s"
            f" AND state NOT IN {FINAL}) ON CONFLICT (content_request_id, attempt, seq) DO UPDATE"
            " SET node_id = excluded.node_id, idx = excluded.idx, key = excluded.key,"
            " path = excluded.path, content_type = excluded.content_type,"
            " bytes = excluded.bytes, width = excluded.width, height = excluded.height,"
            " url = excluded.url",
            job.content_request_id, job.attempt, seq, output.node_id, output.index, output.key,
            output.path, output.content_type, output.bytes, output.width, output.height,
            output.url, job.content_request_id, job.attempt, job.epoch,
        )  # fmt: skip

    async def _count_is_one(self, conn: Conn, sql: str, *params: Any) -> bool:
        return await self._count(conn, sql, *params) == 1

    async def images(self, content_request_id: str, attempt: int) -> list[tuple[int, Output]]:
        rows = await self.db.read(
            self._all,
            f"SELECT * FROM {self._s}.images WHERE content_request_id = %s AND attempt = %s"
            " ORDER BY seq",
            content_request_id,
            attempt,
        )
        return [(r["seq"], output_of(r)) for r in rows]

    # -- instances ----------------------------------------------------------------------

    async def heartbeat(self, instance: str, now: float) -> None:
        await self._write(
            f"INSERT INTO {self._s}.instances (name, heartbeat_at) VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            instance,
            now,
        )

    async def adopt_stale(self, instance: str, now: float, stale_after: float) -> list[str]:
        return await self.db.submit(self._adopt_stale, instance, now - stale_after)

    async def _adopt_stale(self, conn: Conn, instance: str, cutoff: float) -> list[str]:
        """The unfinished jobs and pending callbacks of hosts silent since `cutoff`.

        SKIP LOCKED: two adopters never take the same host. Upload records stay, but the
        runs are re-run (expected_images cleared): their files were on the silent host.
        """
        s = self._s
        async with conn.transaction():
            rows = await self._all(
                conn,
                f"SELECT name FROM {s}.instances WHERE name <> %s AND heartbeat_at < %s"
                " FOR UPDATE SKIP LOCKED",
                instance,
                cutoff,
            )
            stale = [r["name"] for r in rows]
            if not stale:
                return []
            await conn.execute(
                f"UPDATE {s}.jobs SET instance = %s, expected_images = NULL"
                f" WHERE instance = ANY(%s) AND state NOT IN {FINAL}",
                (instance, stale),
            )
            await conn.execute(
                f"UPDATE {s}.outbox SET instance = %s, lease_until = NULL"
                " WHERE instance = ANY(%s) AND state = 'pending'",
                (instance, stale),
            )
            await conn.execute(f"DELETE FROM {s}.instances WHERE name = ANY(%s)", (stale,))
        return stale

    # -- outbox -------------------------------------------------------------------------

    async def due_events(self, instance: str, now: float, limit: int) -> list[OutboxEvent]:
        """Due events not leased to another host, leased to `instance` for LEASE seconds."""
        s = self._s
        rows = await self.db.submit(
            self._all,
            f"UPDATE {s}.outbox o SET instance = %s, lease_until = %s FROM (SELECT event_id"
            f" FROM {s}.outbox WHERE state = 'pending' AND next_attempt_at <= %s"
            " AND (lease_until IS NULL OR lease_until <= %s OR instance = %s)"
            " ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED) AS due"
            " WHERE o.event_id = due.event_id RETURNING o.*",
            instance, now + LEASE, now, now, instance, limit,
        )  # fmt: skip
        rows.sort(key=lambda r: (r["next_attempt_at"], r["event_id"]))
        return [event_of(r) for r in rows]

    async def next_due_at(self, instance: str, in_flight: tuple[str, ...] = ()) -> float | None:
        """When the next pending event not in flight here is due, or its lease elsewhere ends."""
        row = await self.db.read(
            self._one,
            "SELECT min(CASE WHEN instance <> %s AND lease_until > next_attempt_at"
            f" THEN lease_until ELSE next_attempt_at END) AS at FROM {self._s}.outbox"
            " WHERE state = 'pending' AND NOT (event_id = ANY(%s))",
            instance,
            list(in_flight),
        )
        return float(row["at"]) if row and row["at"] is not None else None

    async def event_still_current(self, event_id: str) -> bool:
        s = self._s
        row = await self.db.read(
            self._one,
            f"SELECT o.state, o.attempt, (SELECT max(attempt) FROM {s}.jobs j"
            f" WHERE j.content_request_id = o.content_request_id) AS newest FROM {s}.outbox o"
            " WHERE event_id = %s",
            event_id,
        )
        return bool(row) and row["state"] == "pending" and row["newest"] == row["attempt"]  # type: ignore[index]

    async def record_delivery(
        self,
        event_id: str,
        state: str,
        attempts: int,
        now: float,
        next_attempt_at: float | None = None,
        last_error: str | None = None,
    ) -> None:
        await self._write(
            f"UPDATE {self._s}.outbox SET state = %s, attempts = %s, last_error = %s,"
            " updated_at = %s, next_attempt_at = COALESCE(%s, next_attempt_at),"
            " lease_until = NULL WHERE event_id = %s AND state = 'pending'",
            state, attempts, last_error, now, next_attempt_at, event_id,
        )  # fmt: skip

    async def drop_event(self, event_id: str, now: float) -> None:
        await self._write(
            f"UPDATE {self._s}.outbox SET state = 'dropped', updated_at = %s"
            " WHERE event_id = %s AND state = 'pending'",
            now,
            event_id,
        )

    async def callback_summary(
        self, content_request_id: str, attempt: int
    ) -> CallbackSummary | None:
        row = await self.db.read(
            self._one,
            f"SELECT state, attempts, last_error FROM {self._s}.outbox"
            " WHERE content_request_id = %s AND attempt = %s",
            content_request_id,
            attempt,
        )
        if row is None:
            return None
        return CallbackSummary(row["state"], row["attempts"], row["last_error"])

    async def redeliver_dead(
        self,
        instance: str,
        now: float,
        content_request_id: str | None = None,
        dead_since: float | None = None,
    ) -> list[OutboxEvent]:
        s = self._s
        rows = await self.db.submit(
            self._all,
            f"UPDATE {s}.outbox o SET state = 'pending', attempts = 0, next_attempt_at = %s,"
            " created_at = %s, updated_at = %s, instance = %s, lease_until = NULL,"
            f" last_error = NULL FROM (SELECT d.event_id, d.updated_at FROM {s}.outbox d"
            " WHERE d.state = 'dead' AND (%s::text IS NULL OR d.content_request_id = %s)"
            " AND (%s::float8 IS NULL OR d.updated_at >= %s)"
            f" AND d.attempt = (SELECT max(attempt) FROM {s}.jobs j"
            " WHERE j.content_request_id = d.content_request_id) FOR UPDATE) AS dead"
            " WHERE o.event_id = dead.event_id RETURNING o.*, dead.updated_at AS dead_at",
            now, now, now, instance, content_request_id, content_request_id, dead_since,
            dead_since,
        )  # fmt: skip
        rows.sort(key=lambda r: (r["dead_at"], r["event_id"]))
        return [event_of(r) for r in rows]

    async def outbox_backlog(self) -> tuple[int, int]:
        row = await self.db.read(
            self._one,
            f"SELECT (SELECT count(*) FROM {self._s}.outbox WHERE state = 'pending') AS pending,"
            f" (SELECT count(*) FROM {self._s}.outbox WHERE state = 'dead') AS dead",
        )
        return (int(row["pending"]), int(row["dead"])) if row else (0, 0)

    async def outbox_counts(self) -> dict[str, int]:
        """Events per state; scans the whole outbox (tests and diagnostics)."""
        rows = await self.db.read(
            self._all, f"SELECT state, count(*) AS n FROM {self._s}.outbox GROUP BY state"
        )
        return {r["state"]: int(r["n"]) for r in rows}

    async def aclose(self) -> None:
        await self.db.aclose()
