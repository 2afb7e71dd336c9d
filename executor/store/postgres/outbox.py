"""The Postgres store's instance and outbox rows: heartbeats, adoption, callback events.

Hosts share the outbox: any live host delivers any due event. `due_events` leases what it
returns to the asking host for LEASE seconds (FOR UPDATE SKIP LOCKED: no two hosts take
one event), `finish` leases a new event to the host that finished it, which sends it at
once, and a recorded try ends the lease. A host that dies mid-send leaves its lease to
expire, or to be cleared when a sibling adopts its work; the event keeps its id, so the
receiver de-duplicates a resend.
"""

from __future__ import annotations

from ...jobs import CallbackSummary
from ..base import OutboxEvent
from ..rows import event_of
from .connections import Rows
from .schema import FINAL
from .writer import Conn

LEASE = 120.0  # s an event stays with the host that took it before another may send it


class OutboxRows(Rows):
    """A mixin of `PostgresStore`."""

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
        rows = await self._write_all(
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
        rows = await self._write_all(
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
