"""The Postgres store's tables, their versioned migrations, and how rows become records.

Everything lives in one schema of its own (`courier`, COURIER_DB_SCHEMA), never `public`:
Supabase serves `public` over its REST API to anyone holding the anon key. Every table
has row level security enabled and no policy, so the API roles would see no row even if
the schema were exposed later; the courier connects as the tables' owner, which RLS
does not restrict.

Migrations run at start-up in one transaction under an advisory lock: hosts starting
together on an empty database wait for the first, then find the schema current. Each
version's statements are idempotent.
"""

from __future__ import annotations

import re
from typing import Any

from ...jobs import Job

FINAL = "('success', 'error')"  # in SQL: the final states
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# (version, statements); {s} is the quoted schema name
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
CREATE TABLE IF NOT EXISTS {s}.jobs (
    content_request_id text NOT NULL,
    attempt integer NOT NULL,
    prompt_id text NOT NULL UNIQUE,
    instance text,  -- the host that claimed it; NULL while it waits for one
    state text NOT NULL,
    workflow text NOT NULL,
    fingerprint text NOT NULL,
    runs integer NOT NULL DEFAULT 1,
    epoch integer NOT NULL DEFAULT 1,
    error_type text,
    error_message text,
    node_id text,
    image_urls text NOT NULL DEFAULT '[]',
    expected_images integer,
    cancel_requested boolean NOT NULL DEFAULT false,
    created_at double precision NOT NULL,
    started_at double precision,
    executed_at double precision,
    finished_at double precision,
    PRIMARY KEY (content_request_id, attempt)
);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON {s}.jobs (instance)
    WHERE state NOT IN ('success', 'error');
CREATE INDEX IF NOT EXISTS jobs_waiting ON {s}.jobs (created_at)
    WHERE instance IS NULL AND state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_prunable ON {s}.jobs (finished_at)
    WHERE state IN ('success', 'error') AND workflow <> '';
CREATE INDEX IF NOT EXISTS jobs_cancel_requested ON {s}.jobs (instance)
    WHERE cancel_requested AND state NOT IN ('success', 'error');
CREATE TABLE IF NOT EXISTS {s}.images (
    content_request_id text NOT NULL,
    attempt integer NOT NULL,
    seq integer NOT NULL,
    node_id text NOT NULL,
    idx integer NOT NULL,
    key text NOT NULL,
    path text,
    content_type text NOT NULL,
    bytes integer NOT NULL,
    width integer NOT NULL,
    height integer NOT NULL,
    url text,
    PRIMARY KEY (content_request_id, attempt, seq)
);
CREATE TABLE IF NOT EXISTS {s}.outbox (
    event_id text PRIMARY KEY,
    content_request_id text NOT NULL,
    attempt integer NOT NULL,
    instance text NOT NULL,  -- who holds its lease, or last held it
    lease_until double precision,  -- another host may send it after this time
    body text NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    last_error text,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    UNIQUE (content_request_id, attempt)
);
CREATE INDEX IF NOT EXISTS outbox_due ON {s}.outbox (next_attempt_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_dead ON {s}.outbox (updated_at) WHERE state = 'dead';
CREATE TABLE IF NOT EXISTS {s}.instances (
    name text PRIMARY KEY,
    heartbeat_at double precision NOT NULL
);
ALTER TABLE {s}.jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE {s}.images ENABLE ROW LEVEL SECURITY;
ALTER TABLE {s}.outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE {s}.instances ENABLE ROW LEVEL SECURITY;
""",
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
TABLES = ("jobs", "images", "outbox", "instances", "schema_version")

VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS {s}.schema_version (version integer NOT NULL);
ALTER TABLE {s}.schema_version ENABLE ROW LEVEL SECURITY
"""

# The roles Supabase's REST API runs as: no grant of ours ever reaches them.
API_ROLES = ("anon", "authenticated")

# A lot's admission in one statement: each id's latest attempt (`prior`), the next attempt
# inserted unless it blocks (Job.blocks: only a final error with the same workflow lets a
# request start the next), older attempts' pending events dropped, the hosts told of a
# job that waits. Rows: (cid, attempt) per insert, (cid, prior) per id that had one.
ADMIT = """
WITH lot AS (
    SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
                         %s::int[], %s::int[], %s::float8[])
        AS l(cid, prompt_id, instance, workflow, fingerprint, runs, epoch, created_at)),
prior AS (
    SELECT DISTINCT ON (j.content_request_id) j.* FROM {s}.jobs j
    WHERE j.content_request_id IN (SELECT cid FROM lot)
    ORDER BY j.content_request_id, j.attempt DESC),
fresh AS (
    INSERT INTO {s}.jobs (content_request_id, attempt, prompt_id, instance, state, workflow,
                          fingerprint, runs, epoch, created_at)
    SELECT l.cid, COALESCE(p.attempt, 0) + 1, l.prompt_id, NULLIF(l.instance, ''), 'queued',
           l.workflow, l.fingerprint, l.runs, l.epoch, l.created_at
    FROM lot l LEFT JOIN prior p ON p.content_request_id = l.cid
    WHERE p.content_request_id IS NULL OR (p.fingerprint = l.fingerprint AND p.state = 'error')
    ON CONFLICT DO NOTHING
    RETURNING content_request_id, attempt, instance, created_at),
dropped AS (
    UPDATE {s}.outbox o SET state = 'dropped', updated_at = f.created_at FROM fresh f
    WHERE o.content_request_id = f.content_request_id AND o.attempt < f.attempt
      AND o.state = 'pending'
    RETURNING 1),
told AS (
    SELECT pg_notify(%s, 'job') FROM (SELECT 1 FROM fresh WHERE instance IS NULL LIMIT 1) w)
SELECT content_request_id AS cid, attempt, NULL::jsonb AS prior FROM fresh
UNION ALL SELECT content_request_id, NULL, to_jsonb(prior) FROM prior
UNION ALL SELECT NULL, NULL, NULL FROM told
"""

# The usual admission: one request for an id never seen (its first attempt); no join, no
# sort, no arrays. A job no host claimed yet is announced. Nothing inserted: ADMIT decides.
ADMIT_NEW = """
WITH fresh AS (
    INSERT INTO {s}.jobs (content_request_id, attempt, prompt_id, instance, state, workflow,
                          fingerprint, runs, epoch, created_at)
    SELECT %s, 1, %s, NULLIF(%s, ''), 'queued', %s, %s, %s, %s, %s
    WHERE NOT EXISTS (SELECT 1 FROM {s}.jobs WHERE content_request_id = %s)
    ON CONFLICT DO NOTHING RETURNING instance)
SELECT CASE WHEN instance IS NULL THEN pg_notify(%s, 'job')::text END AS told FROM fresh
"""

JOB_COLUMNS = (
    "content_request_id, attempt, prompt_id, instance, state, workflow, fingerprint, runs,"
    " epoch, created_at"
)


def quoted(schema: str) -> str:
    if not SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"not a plain schema name: {schema!r}")
    return f'"{schema}"'


def job_values(job: Job) -> tuple[Any, ...]:
    """A new attempt's row, in JOB_COLUMNS order; instance '' is a job waiting for a host."""
    return (
        job.content_request_id,
        job.attempt,
        job.prompt_id,
        job.instance or None,
        job.state.value,
        job.workflow,
        job.fingerprint,
        job.runs,
        job.epoch,
        job.created_at,
    )
