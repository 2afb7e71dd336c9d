"""The SQLite journal's schema, its statements, and how its rows become records."""

from __future__ import annotations

# 9 values a job row: 900 stays under the 999 bound values of SQLite builds before 3.32
ROWS_PER_STATEMENT = 100

# 2: outbox_dead index; 4: jobs_prunable (retention) and jobs_cancel_requested indexes (3
# was a development version with an index of every finished job); 5: jobs.epoch, the
# fencing token (ADDED_COLUMNS). Each version's statements are idempotent, so one pass
# over SCHEMA and ADDED_COLUMNS migrates any older journal.
SCHEMA_VERSION = 5

# (table, column, definition): columns an older journal's table lacks
ADDED_COLUMNS = (("jobs", "epoch", "INTEGER NOT NULL DEFAULT 1"),)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    content_request_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    prompt_id TEXT NOT NULL UNIQUE,
    instance TEXT NOT NULL,
    state TEXT NOT NULL,
    workflow TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    runs INTEGER NOT NULL DEFAULT 1,
    epoch INTEGER NOT NULL DEFAULT 1,
    error_type TEXT,
    error_message TEXT,
    node_id TEXT,
    image_urls TEXT NOT NULL DEFAULT '[]',
    expected_images INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    executed_at REAL,
    finished_at REAL,
    PRIMARY KEY (content_request_id, attempt)
);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (instance, state)
    WHERE state NOT IN ('success', 'error');
CREATE INDEX IF NOT EXISTS jobs_prunable ON jobs (finished_at)
    WHERE state IN ('success', 'error') AND workflow <> '';
DROP INDEX IF EXISTS jobs_finished;
CREATE INDEX IF NOT EXISTS jobs_cancel_requested ON jobs (instance)
    WHERE cancel_requested = 1 AND state NOT IN ('success', 'error');
CREATE TABLE IF NOT EXISTS images (
    content_request_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    key TEXT NOT NULL,
    path TEXT,
    content_type TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    url TEXT,
    PRIMARY KEY (content_request_id, attempt, seq)
);
CREATE TABLE IF NOT EXISTS outbox (
    event_id TEXT PRIMARY KEY,
    content_request_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    instance TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (content_request_id, attempt)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (instance, next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_dead ON outbox (instance) WHERE state = 'dead';
CREATE TABLE IF NOT EXISTS instances (
    name TEXT PRIMARY KEY,
    heartbeat_at REAL NOT NULL
);
"""


# Final attempts not slimmed yet, finished before ?, whose callback is not pending; the
# terms repeat jobs_prunable's WHERE so SQLite reads that index.
PRUNABLE = (
    "SELECT content_request_id, attempt FROM jobs"
    " WHERE state IN ('success', 'error') AND workflow <> '' AND finished_at < ?"
    " AND NOT EXISTS (SELECT 1 FROM outbox o"
    "  WHERE o.content_request_id = jobs.content_request_id"
    "  AND o.attempt = jobs.attempt AND o.state = 'pending')"
    " ORDER BY finished_at LIMIT ?"
)

# Polled every 2 s while an instance has jobs: from jobs_cancel_requested, whose terms it
# repeats (the unfinished-jobs index took 15 ms with 20,000 queued; this one takes 0.01 ms).
CANCEL_REQUESTS = (
    "SELECT prompt_id FROM jobs WHERE instance = ?"
    " AND cancel_requested = 1 AND state NOT IN ('success', 'error')"
)
