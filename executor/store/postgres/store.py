"""The Postgres store: the `Store` of several hosts sharing one database.

Same guarantees as the SQLite journal: each method is one transaction (most are one
statement), committed before it returns; a job's final state and its outbox event are
written by one statement, once per attempt; writes are applied in call order (one
writer connection, `connections.py`); admissions share transactions (group commit).
Admissions and claims go beside that queue, on pooled connections: they write only new
rows or waiting ones, which no queued write depends on, and a request must not wait
behind another job's writes (with a database 10 ms away, one round trip each).

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
from collections.abc import Callable
from typing import Any, TypeVar

from ...jobs import Job, JobState, Output
from ..base import OutboxEvent, next_attempts
from ..group_commit import GroupCommit
from ..rows import FINAL_SET, final_values, job_of, output_of
from . import dsn
from .connections import Connections
from .fleet import FleetRows
from .outbox import LEASE, OutboxRows
from .schema import ADMIT, ADMIT_NEW, FINAL, JOB_COLUMNS, job_values, quoted
from .writer import Conn, Cursor

R = TypeVar("R")


# set_state's fields, and how each is stored
STATE_FIELDS = {"started_at", "executed_at", "expected_images", "cancel_requested"}


class PostgresStore(OutboxRows, FleetRows):
    kind = "postgres"

    def __init__(self, url: str, schema: str = "courier", pool_size: int = 3) -> None:
        self.schema = schema
        self.channel = f"comfy_courier_{schema}"
        self.db = Connections(dsn.prepare(url), dsn.describe(url), schema, pool_size)
        self._s = s = quoted(schema)
        self._admit: GroupCommit[Job, Job | int] = GroupCommit(self.db.beside, self._admit_many)
        self._admit_sql = ADMIT.format(s=s)
        self._admit_new_sql = ADMIT_NEW.format(s=s)
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

    # -- jobs ---------------------------------------------------------------------------

    async def admit(
        self, job: Job, then: Callable[[Job | int], R], after: Callable[[R], None]
    ) -> R:
        return await self._admit(job, then, after)

    async def _admit_many(self, conn: Conn, jobs: list[Job]) -> list[Job | int]:
        """The duplicate rule and the inserts of a lot (journal.admit), usually in one
        statement: one round trip to the database, which is what a remote one costs.

        The statement reads each id's latest attempt and inserts the next where nothing
        blocks it; an insert that meets a concurrent one for the same attempt (another
        host, the same id) is left out (ON CONFLICT DO NOTHING) and decided again under a
        lock, as are a lot's later requests for an id it already holds (the admission
        itself never sends two at once).
        """
        if len(jobs) == 1:  # the usual: one request at a time
            job = jobs[0]
            new = await self._one(
                conn, self._admit_new_sql, job.content_request_id, job.prompt_id, job.instance,
                job.workflow, job.fingerprint, job.runs, job.epoch, job.created_at,
                job.content_request_id, self.channel,
            )  # fmt: skip
            if new is not None:
                return [1]
        answers: dict[int, Job | int] = {}
        firsts: dict[str, int] = {}
        for n, job in enumerate(jobs):
            firsts.setdefault(job.content_request_id, n)
        lot = [jobs[n] for n in firsts.values()]
        rows = await self._all(
            conn,
            self._admit_sql,
            [j.content_request_id for j in lot],
            [j.prompt_id for j in lot],
            [j.instance for j in lot],
            [j.workflow for j in lot],
            [j.fingerprint for j in lot],
            [j.runs for j in lot],
            [j.epoch for j in lot],
            [j.created_at for j in lot],
            self.channel,
        )
        fresh = {r["cid"]: int(r["attempt"]) for r in rows if r["attempt"] is not None}
        prior = {r["cid"]: job_of(r["prior"]) for r in rows if r["prior"] is not None}
        for cid, n in firsts.items():
            if cid in fresh:
                answers[n] = fresh[cid]
            elif cid in prior and prior[cid].blocks(jobs[n].fingerprint):
                answers[n] = prior[cid]
        again = [n for n in range(len(jobs)) if n not in answers]  # races, later requests
        if again:
            decided = await self._admit_locked(conn, [jobs[n] for n in again])
            answers.update(zip(again, decided, strict=True))
        return [answers[n] for n in range(len(jobs))]

    async def _admit_locked(self, conn: Conn, jobs: list[Job]) -> list[Job | int]:
        """The same in a transaction that first takes each id's advisory lock (in sorted
        order: no deadlock between hosts), so a concurrent request on another host waits
        and then sees this one."""
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
            results, accepted = next_attempts(jobs, latest)
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
        row = await self._write_one(
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
        return await self._requeue(conn, old, new, int(count_run))

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
            f"UPDATE {s}.jobs SET {FINAL_SET.format(p='%s')}"
            f" WHERE prompt_id = %s AND epoch = %s AND state NOT IN {FINAL} RETURNING 1"
        )
        params: list[Any] = list(final_values(job))
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
        row = await self._write_one(
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
        return self._write_is_one(
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

    def _write_is_one(self, sql: str, *params: Any) -> asyncio.Future[bool]:
        """One statement through the writer, queued now: whether it changed one row."""
        return self.db.statement(sql, params, _changed_one)

    async def images(self, content_request_id: str, attempt: int) -> list[tuple[int, Output]]:
        rows = await self.db.read(
            self._all,
            f"SELECT * FROM {self._s}.images WHERE content_request_id = %s AND attempt = %s"
            " ORDER BY seq",
            content_request_id,
            attempt,
        )
        return [(r["seq"], output_of(r)) for r in rows]

    async def aclose(self) -> None:
        await self.db.aclose()


async def _changed_one(cur: Cursor) -> bool:
    return cur.rowcount == 1
