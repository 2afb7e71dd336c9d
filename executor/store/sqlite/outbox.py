"""The SQLite journal's instance and outbox rows: heartbeats, adoption, callback events.

A mixin of `Journal` (journal.py), which owns the connection and its transactions.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any

from ...jobs import CallbackSummary
from ..base import OutboxEvent
from ..rows import event_of


class OutboxRows:
    _db: sqlite3.Connection

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # Journal's

    # -- instances ----------------------------------------------------------------------

    def heartbeat(self, instance: str, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO instances (name, heartbeat_at) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (instance, now),
            )

    def adopt_stale(self, instance: str, now: float, stale_after: float) -> list[str]:
        """Take over the unfinished jobs and pending callbacks of instances gone silent.

        A ComfyUI whose name changed (a recreated container gets a new hostname) or that
        never came back leaves work behind; a live sibling finishes it. One transaction, so
        two adopters never both take the same instance.
        """
        with self._tx() as db:
            stale = [
                row[0]
                for row in db.execute(
                    "SELECT name FROM instances WHERE name != ? AND heartbeat_at < ?",
                    (instance, now - stale_after),
                )
            ]
            for name in stale:
                db.execute(
                    "UPDATE jobs SET instance = ? WHERE instance = ?"
                    " AND state NOT IN ('success', 'error')",
                    (instance, name),
                )
                db.execute(
                    "UPDATE outbox SET instance = ? WHERE instance = ? AND state = 'pending'",
                    (instance, name),
                )
                db.execute("DELETE FROM instances WHERE name = ?", (name,))
        return stale

    # -- outbox -------------------------------------------------------------------------

    def due_events(self, instance: str, now: float, limit: int) -> list[OutboxEvent]:
        rows = self._db.execute(
            "SELECT * FROM outbox WHERE instance = ? AND state = 'pending'"
            " AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
            (instance, now, limit),
        ).fetchall()
        return [event_of(r) for r in rows]

    def next_due_at(self, instance: str, in_flight: tuple[str, ...] = ()) -> float | None:
        """When the next pending event not already being sent is due."""
        marks = ",".join("?" * len(in_flight))
        row = self._db.execute(
            "SELECT min(next_attempt_at) FROM outbox WHERE instance = ? AND state = 'pending'"
            + (f" AND event_id NOT IN ({marks})" if in_flight else ""),
            (instance, *in_flight),
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def event_still_current(self, event_id: str) -> bool:
        """False once a newer attempt of the same id exists: its events supersede this one."""
        row = self._db.execute(
            "SELECT o.state, (SELECT max(attempt) FROM jobs j"
            "  WHERE j.content_request_id = o.content_request_id) AS newest, o.attempt"
            " FROM outbox o WHERE event_id = ?",
            (event_id,),
        ).fetchone()
        return bool(row) and row["state"] == "pending" and row["newest"] == row["attempt"]

    def record_delivery(
        self,
        event_id: str,
        state: str,
        attempts: int,
        now: float,
        next_attempt_at: float | None = None,
        last_error: str | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET state = ?, attempts = ?, last_error = ?, updated_at = ?,"
                " next_attempt_at = COALESCE(?, next_attempt_at)"
                " WHERE event_id = ? AND state = 'pending'",  # a dropped event stays dropped
                (state, attempts, last_error, now, next_attempt_at, event_id),
            )

    def drop_event(self, event_id: str, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET state = 'dropped', updated_at = ?"
                " WHERE event_id = ? AND state = 'pending'",
                (now, event_id),
            )

    def callback_summary(self, content_request_id: str, attempt: int) -> CallbackSummary | None:
        row = self._db.execute(
            "SELECT state, attempts, last_error FROM outbox"
            " WHERE content_request_id = ? AND attempt = ?",
            (content_request_id, attempt),
        ).fetchone()
        if row is None:
            return None
        return CallbackSummary(row["state"], row["attempts"], row["last_error"])

    def outbox_backlog(self) -> tuple[int, int]:
        """(pending, dead) events, from their partial indexes: cheap however many were
        delivered (health and metrics ask often; delivered rows are most of the outbox)."""
        pending = self._db.execute("SELECT count(*) FROM outbox WHERE state = 'pending'")
        dead = self._db.execute("SELECT count(*) FROM outbox WHERE state = 'dead'")
        return int(pending.fetchone()[0]), int(dead.fetchone()[0])

    def outbox_counts(self) -> dict[str, int]:
        """Events per state; scans the whole outbox (tests and diagnostics)."""
        rows = self._db.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def redeliver_dead(
        self,
        instance: str,
        now: float,
        content_request_id: str | None = None,
        dead_since: float | None = None,
    ) -> list[OutboxEvent]:
        """Put dead-lettered callbacks back in the outbox, due now, for `instance` to send.

        One id's dead event, or every event dead-lettered at or after `dead_since` (its
        `updated_at`). Only an id's latest attempt: an older attempt's event must never
        arrive. Each keeps its event id (the receiver's `webhook-id`, so it de-duplicates)
        and body; its tries count from zero again, and `created_at` becomes `now`, so it
        gets the whole schedule and a new retry horizon. The instance asking delivers them.
        """
        clauses: list[str] = []
        params: list[Any] = []
        if content_request_id is not None:
            clauses.append("o.content_request_id = ?")
            params.append(content_request_id)
        if dead_since is not None:
            clauses.append("o.updated_at >= ?")
            params.append(dead_since)
        with self._tx() as db:
            rows = db.execute(
                "SELECT o.* FROM outbox o WHERE o.state = 'dead'"
                + "".join(f" AND {c}" for c in clauses)
                + " AND o.attempt = (SELECT max(attempt) FROM jobs j"
                "  WHERE j.content_request_id = o.content_request_id)"
                " ORDER BY o.updated_at",
                params,
            ).fetchall()
            db.executemany(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?,"
                " created_at = ?, updated_at = ?, instance = ?, last_error = NULL"
                " WHERE event_id = ? AND state = 'dead'",
                [(now, now, now, instance, row["event_id"]) for row in rows],
            )
        return [replace(event_of(row), attempts=0, created_at=now) for row in rows]
