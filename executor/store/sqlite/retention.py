"""The SQLite journal's retention: old finished attempts slimmed to their outcome.

A mixin of `Journal` (journal.py), which owns the connection and its transactions.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from functools import cached_property

from .schema import PRUNABLE


class RetentionRows:
    _db: sqlite3.Connection

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # Journal's

    @cached_property
    def _slim_statement(self) -> str:
        """prune's rewrite of a jobs row without its workflow (every other column kept)."""
        columns = [row[1] for row in self._db.execute("PRAGMA table_info(jobs)")]
        values = ", ".join("''" if c == "workflow" else c for c in columns)
        return (
            f"INSERT OR REPLACE INTO jobs ({', '.join(columns)}) SELECT {values}"
            " FROM jobs WHERE content_request_id = ? AND attempt = ?"
        )

    def prune(self, finished_before: float, limit: int) -> int:
        """Slim up to `limit` final attempts that finished before `finished_before`.

        Each loses its workflow, image records and callback record; an id's latest attempt
        keeps its row, the outcome, so the id still replays instead of running twice and a
        new attempt never reuses its image paths (`<id>/<attempt>-<n>`). Older attempts go.
        An attempt whose callback is still being delivered waits. Oldest first, from the
        jobs_prunable index, which slimmed rows leave: a batch costs the same however
        large the journal is.
        """
        with self._tx() as db:
            rows = db.execute(PRUNABLE, (finished_before, limit)).fetchall()
            keys = [(r["content_request_id"], r["attempt"]) for r in rows]
            # with every earlier attempt: those finished first, and slimmed ones left the index
            for table in ("images", "outbox"):
                db.executemany(
                    f"DELETE FROM {table} WHERE content_request_id = ? AND attempt <= ?", keys
                )
            db.executemany("DELETE FROM jobs WHERE content_request_id = ? AND attempt < ?", keys)
            db.executemany(
                "DELETE FROM jobs WHERE content_request_id = ? AND attempt = ? AND attempt <"
                " (SELECT max(attempt) FROM jobs WHERE content_request_id = ?)",
                [(cid, attempt, cid) for cid, attempt in keys],
            )
            # Rewritten, not updated in place: a shrunk row would leave its page mostly
            # empty and never reused (new rows go to the end), so the file would keep
            # growing; rewritten rows pack together and the emptied pages are reused.
            db.executemany(self._slim_statement, keys)
        return len(keys)
