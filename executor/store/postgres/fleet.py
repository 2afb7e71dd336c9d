"""What the Postgres store adds for a fleet of hosts (`store.base.Fleet`): waiting jobs
claimed by whichever host can start one, and the notices that wake the hosts.

A job a busy host accepts is committed with no instance; `claim` hands the oldest waiting
jobs to a host (FOR UPDATE SKIP LOCKED: two hosts never take the same one, and neither
waits for the other) under a raised epoch, the claim's fencing token. Every host LISTENs
on one channel: "job" when a job starts waiting, "cancel <host>" when a DELETE needs a
host's attention. A notice is a hint, never the only path: each host also polls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg

from ...errors import StoreError
from ...jobs import Job
from ..rows import job_of
from .connections import Rows
from .writer import Conn

log = logging.getLogger(__name__)

WAITING = "instance IS NULL AND state = 'queued'"  # the jobs_waiting index's terms
LISTEN_RETRY = (0.5, 5.0)  # s: first and longest wait before the listener reconnects
# a dead server behind a silent network is noticed by TCP keepalives within ~25 s
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
              "keepalives_count": 3}  # fmt: skip


class FleetRows(Rows):
    """A mixin of `PostgresStore`: waiting jobs, claims and notices."""

    async def claim(self, instance: str, limit: int) -> tuple[list[Job], int]:
        """Beside the writer: the next job is claimed while this host's last one still has
        writes queued (its upload records, its end), so its GPU waits for one round trip."""
        return await self.db.beside(self._claim, instance, limit)

    async def _claim(self, conn: Conn, instance: str, limit: int) -> tuple[list[Job], int]:
        """One statement (one round trip): the claimed rows, and the waiting count as it
        was before them."""
        s = self._s
        rows = await self._all(
            conn,
            f"WITH picked AS (SELECT content_request_id, attempt FROM {s}.jobs WHERE {WAITING}"
            " ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED),"
            f" claimed AS (UPDATE {s}.jobs j SET instance = %s, epoch = j.epoch + 1 FROM picked"
            " WHERE j.content_request_id = picked.content_request_id"
            " AND j.attempt = picked.attempt RETURNING j.*)"
            " SELECT to_jsonb(claimed) AS job, NULL::bigint AS waiting FROM claimed"
            f" UNION ALL SELECT NULL, count(*) FROM {s}.jobs WHERE {WAITING}",
            limit,
            instance,
        )
        jobs = sorted((job_of(r["job"]) for r in rows if r["job"]), key=lambda j: j.created_at)
        waiting = sum(int(r["waiting"]) for r in rows if r["waiting"] is not None)
        return jobs, max(0, waiting - len(jobs))

    async def count_waiting(self) -> int:
        row = await self.db.read(
            self._one, f"SELECT count(*) AS n FROM {self._s}.jobs WHERE {WAITING}"
        )
        return int(row["n"]) if row else 0

    async def waiting_ahead(self, created_at: float) -> int:
        row = await self.db.read(
            self._one,
            f"SELECT count(*) AS n FROM {self._s}.jobs WHERE {WAITING} AND created_at < %s",
            created_at,
        )
        return int(row["n"]) if row else 0

    async def released(self, old_prompt_id: str, new_prompt_id: str, now: float) -> int | None:
        return await self.db.submit(self._released, old_prompt_id, new_prompt_id)

    async def _released(self, conn: Conn, old: str, new: str) -> int | None:
        """The run ended with its host: the job waits for any host again, at its old place
        in line (created_at is kept); its images are recorded again by the next run."""
        return await self._requeue(conn, old, new, 1, to_fleet=True)

    async def live_hosts(self, now: float, within: float) -> int:
        row = await self.db.read(
            self._one,
            f"SELECT count(*) AS n FROM {self._s}.instances WHERE heartbeat_at >= %s",
            now - within,
        )
        return int(row["n"]) if row else 0

    async def listen(self, notice: Callable[[str, str], None]) -> None:
        """LISTEN on the fleet's channel for as long as the task runs, reconnecting after a
        lost connection; "reconnected" after each (re)connect, since notices sent while it
        was away are lost."""
        delay = LISTEN_RETRY[0]
        down = False
        while True:
            try:
                conn = await self.db.connect(**KEEPALIVES)
                try:
                    await conn.execute(f'LISTEN "{self.channel}"')
                    if down:
                        log.warning("[courier] database notices are back")
                    down, delay = False, LISTEN_RETRY[0]
                    notice("reconnected", "")
                    async for message in conn.notifies():
                        kind, _, argument = message.payload.partition(" ")
                        notice(kind, argument)
                finally:
                    await conn.close()
            except (StoreError, psycopg.Error) as e:
                if not down:
                    log.warning("[courier] lost database notices (%s); reconnecting", e)
                down = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY[1])
