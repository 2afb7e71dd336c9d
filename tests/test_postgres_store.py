"""What only the PostgreSQL store does: its schema (never public, row level security on,
no policy), migrations several hosts run at once, the connection string's rules, the
instance lock, leases on callbacks, and a database that goes away and comes back.
The behaviour it shares with SQLite is in test_store_contract.py."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from comfy_courier.executor.errors import NotConfigured, StoreError
from comfy_courier.executor.jobs import Job, JobState, Output
from comfy_courier.executor.settings import Settings
from comfy_courier.executor.store import OutboxEvent

from conftest import API_KEY, model_free

psycopg = pytest.importorskip("psycopg", reason="pip install -e '.[test,postgres]'")

from comfy_courier.executor.store.postgres import dsn  # noqa: E402
from comfy_courier.executor.store.postgres.schema import SCHEMA_VERSION, TABLES  # noqa: E402
from comfy_courier.executor.store.postgres.store import PostgresStore  # noqa: E402


def sql(url, statement, *params):
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else None


def job(cid="j1", prompt_id="p1", instance="a:1") -> Job:
    return Job(content_request_id=cid, attempt=0, prompt_id=prompt_id, instance=instance,
               workflow="{}", fingerprint="f", created_at=1.0)


async def admitted(store, new: Job) -> Job:
    new.attempt = await store.admit(new, lambda r: r, lambda _: None)
    return new


@pytest.fixture
async def make_store(postgres_url, pg_schema):
    """make_store(url=postgres_url, schema=pg_schema): closed after the test, pass or fail
    (an open pool would keep the loop from closing)."""
    made: list[PostgresStore] = []

    def make(url: str = postgres_url, schema: str = pg_schema) -> PostgresStore:
        made.append(PostgresStore(url, schema))
        return made[-1]

    yield make
    for store in made:
        await store.aclose()


@pytest.fixture
async def store(make_store):
    return make_store()


# -- the schema -----------------------------------------------------------------------


async def test_tables_live_in_their_schema_with_row_level_security_and_no_policy(
        store, postgres_url, pg_schema):
    await store.heartbeat("a:1", 1.0)
    rows = sql(postgres_url, "SELECT c.relname, c.relrowsecurity FROM pg_class c JOIN"
               " pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND"
               " c.relkind = 'r' ORDER BY 1", pg_schema)
    assert sorted(rows) == sorted((table, True) for table in TABLES)
    assert sql(postgres_url, "SELECT count(*) FROM pg_policies WHERE schemaname = %s",
               pg_schema) == [(0,)]
    assert sql(postgres_url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
               " AND tablename = ANY(%s)", list(TABLES)) == [(0,)]
    assert sql(postgres_url, f'SELECT version FROM "{pg_schema}".schema_version') == [
        (SCHEMA_VERSION,)]


async def test_the_rest_api_roles_get_no_grant_and_see_no_row(make_store, postgres_url,
                                                               pg_schema):
    # Supabase's roles, with default privileges that grant them every new table
    for role in ("anon", "authenticated"):
        if not sql(postgres_url, "SELECT 1 FROM pg_roles WHERE rolname = %s", role):
            sql(postgres_url, f"CREATE ROLE {role} NOLOGIN")
    sql(postgres_url, "ALTER DEFAULT PRIVILEGES FOR ROLE postgres GRANT ALL ON TABLES TO anon,"
        " authenticated")
    try:
        await admitted(make_store(), job())
    finally:
        sql(postgres_url, "ALTER DEFAULT PRIVILEGES FOR ROLE postgres REVOKE ALL ON TABLES FROM"
            " anon, authenticated")
    for role in ("anon", "authenticated"):
        assert sql(postgres_url, "SELECT has_table_privilege(%s, %s, 'SELECT')", role,
                   f'"{pg_schema}".jobs') == [(False,)]
    # even granted by mistake (and the schema exposed), RLS shows them nothing
    sql(postgres_url, f'GRANT USAGE ON SCHEMA "{pg_schema}" TO anon;'
        f' GRANT SELECT ON "{pg_schema}".jobs TO anon')
    with psycopg.connect(postgres_url) as conn:
        conn.execute("SET ROLE anon")
        assert conn.execute(f'SELECT count(*) FROM "{pg_schema}".jobs').fetchone() == (0,)
    assert sql(postgres_url, f'SELECT count(*) FROM "{pg_schema}".jobs') == [(1,)]


async def test_hosts_starting_together_on_an_empty_database_migrate_once(
        make_store, postgres_url, pg_schema):
    stores = [make_store() for _ in range(3)]
    await asyncio.gather(*(s.heartbeat(f"h{i}:1", 1.0) for i, s in enumerate(stores)))
    assert sql(postgres_url, f'SELECT version FROM "{pg_schema}".schema_version') == [
        (SCHEMA_VERSION,)]
    assert sql(postgres_url, f'SELECT count(*) FROM "{pg_schema}".instances') == [(3,)]


async def test_a_schema_from_a_newer_courier_is_refused(make_store, postgres_url, pg_schema):
    await make_store().heartbeat("a:1", 1.0)
    sql(postgres_url, f'UPDATE "{pg_schema}".schema_version SET version = 99')
    with pytest.raises(StoreError, match="version 99, newer than this comfy-courier"):
        await make_store().latest("x")


async def test_a_schema_made_by_an_admin_works_without_the_right_to_create_one(
        make_store, postgres_url, pg_schema):
    if not sql(postgres_url, "SELECT 1 FROM pg_roles WHERE rolname = 'courier_host'"):
        sql(postgres_url, "CREATE ROLE courier_host LOGIN")
    sql(postgres_url, "REVOKE CREATE ON DATABASE postgres FROM PUBLIC")
    sql(postgres_url, f'CREATE SCHEMA "{pg_schema}" AUTHORIZATION courier_host')
    limited = postgres_url.replace("postgres@", "courier_host@", 1)
    store = make_store(limited)
    await admitted(store, job())
    assert (await store.latest("j1")).attempt == 1
    owners = sql(postgres_url, "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = %s",
                 pg_schema)
    assert owners == [("courier_host",)]


# -- the connection string ------------------------------------------------------------


@pytest.mark.parametrize("url, sslmode", [
    ("postgresql://u:pw@db.abcd.supabase.co:5432/postgres", "require"),
    ("postgres://u.abcd:pw@aws-0-eu-central-1.pooler.supabase.com:5432/postgres", "require"),
    ("postgresql://u:pw@db.example.com/app?sslmode=verify-full", "verify-full"),
    ("postgresql://u:pw@127.0.0.1:5432/app", None),
    ("postgresql://u:pw@localhost/app", None),
    ("postgresql://u:pw@[::1]:5432/app", None),
    ("postgresql:///app?host=/var/run/postgresql", None),
])
def test_tls_is_required_beyond_loopback_unless_the_url_says_otherwise(url, sslmode):
    params = psycopg.conninfo.conninfo_to_dict(dsn.prepare(url))
    assert params.get("sslmode") == sslmode
    assert params["application_name"] == "comfy-courier"


@pytest.mark.parametrize("url", [
    "postgres://u.abcd:pw@aws-0-eu-central-1.pooler.supabase.com:6543/postgres",
    "postgresql://u:pw@pgbouncer.internal:6543/app",
])
def test_a_transaction_pooler_is_refused_with_what_to_use_instead(url):
    with pytest.raises(NotConfigured, match="transaction pooler.*session pooler.*port 5432"):
        dsn.prepare(url)


def test_an_unreadable_url_is_refused_without_echoing_the_password():
    with pytest.raises(NotConfigured) as caught:
        dsn.prepare("postgresql://u:s3cret@host:notaport/db?bogus_option=1")
    assert "s3cret" not in str(caught.value)
    assert dsn.describe("postgresql://u:s3cret@db.example.com:5433/app") == (
        "db.example.com:5433/app")


def test_settings_take_a_postgres_url_and_schema_and_redact_the_password():
    settings = Settings.from_env({
        "COURIER_API_KEY": API_KEY, "COURIER_DB_SCHEMA": "Fleet_1",
        "COURIER_DB": "postgres://courier:p%40ss@db.abcd.supabase.co:5432/postgres"})
    assert settings.db_url.startswith("postgres://") and settings.db_path is None
    assert settings.db_schema == "fleet_1"
    assert "p%40ss" in settings.secrets and "p@ss" in settings.secrets
    assert "p%40ss" not in repr(settings)
    public = Settings.from_env({"COURIER_API_KEY": API_KEY, "COURIER_DB_SCHEMA": "public"})
    assert public.db_schema == "courier"
    assert any("not public" in p for p in public.problems)


def test_without_psycopg_the_courier_says_what_to_install(monkeypatch, caplog, tmp_path):
    from comfy_courier import wiring
    from comfy_courier.executor.store.postgres import open_postgres

    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(NotConfigured, match=r"pip install 'comfy-courier\[postgres\]'"):
        open_postgres("postgresql://u:pw@db.example.com/app")
    settings = Settings.from_env({"COURIER_API_KEY": API_KEY,
                                  "COURIER_DB": "postgresql://u:pw@db.example.com/app"})
    with pytest.raises(NotConfigured):
        wiring.build_store(settings, adapter=None)


# -- the instance lock ----------------------------------------------------------------


async def test_one_live_process_holds_an_instance_name(make_store):
    first, twin = make_store(), make_store()
    assert await asyncio.to_thread(first.claim_instance, "gpu-1")
    assert not await asyncio.to_thread(twin.claim_instance, "gpu-1")
    assert await asyncio.to_thread(twin.claim_instance, "gpu-2")
    first.release_instance()  # as if it died: the server drops the lock with the session
    assert await asyncio.to_thread(twin.claim_instance, "gpu-1")


# -- callbacks shared by hosts --------------------------------------------------------


async def test_a_callback_is_leased_to_the_host_that_finished_it_then_to_any(store):
    done = await admitted(store, job())
    done.state, done.finished_at = JobState.SUCCESS, 10.0
    assert await store.finish(done, OutboxEvent("msg_1", "j1", 1, b"{}", 0, 10.0))
    # a.1 sends it now; b:1 does not take it while the lease runs
    assert await store.due_events("b:1", 11.0, 10) == []
    assert await store.next_due_at("b:1") == pytest.approx(10.0 + 120.0)
    assert [e.event_id for e in await store.due_events("a:1", 11.0, 10)] == ["msg_1"]
    # the lease ends (a:1 died mid-send): b:1 sends it, under the same event id
    [taken] = await store.due_events("b:1", 10.0 + 121.0, 10)
    assert taken.event_id == "msg_1"
    assert await store.due_events("a:1", 10.0 + 122.0, 10) == []  # now b:1's
    # a failed try frees it for whichever host is free when it is due again
    await store.record_delivery("msg_1", "pending", 1, 140.0, 150.0, "HTTP 503")
    assert await store.next_due_at("a:1") == 150.0
    assert [e.event_id for e in await store.due_events("a:1", 150.0, 10)] == ["msg_1"]


# -- the database goes away -----------------------------------------------------------


async def test_an_unreachable_database_fails_calls_with_store_error(make_store):
    from pgcluster import free_port

    store = make_store(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    with pytest.raises(StoreError, match="127.0.0.1"):
        await store.latest("x")
    with pytest.raises(StoreError):
        await store.admit(job(), lambda r: r, lambda _: None)
    with pytest.raises(StoreError):
        await asyncio.to_thread(store.claim_instance, "a:1")


async def test_a_connection_cut_mid_run_fails_one_call_then_reconnects_and_rescans(
        make_store, postgres_url, pg_schema, caplog):
    store = make_store(f"{postgres_url}?application_name=cut_{pg_schema}")
    lost: list[str] = []
    store.on_lost = lambda: lost.append("rescan")
    run = await admitted(store, job())
    await store.heartbeat("a:1", 1.0)  # the writer's connection exists
    assert await store.latest("j1") is not None  # and pooled ones
    sql(postgres_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = %s", f"cut_{pg_schema}")
    with pytest.raises(StoreError):
        await store.set_state("p1", JobState.RUNNING, epoch=1)
    assert (await store.latest("j1")).state is JobState.QUEUED  # the read is retried
    with caplog.at_level(logging.WARNING):
        assert await store.set_state("p1", JobState.RUNNING, epoch=run.epoch)
    await asyncio.sleep(0)
    assert lost == ["rescan"]
    assert "is back; rescanning" in caplog.text


async def test_a_courier_on_postgres_runs_a_job_end_to_end(make_harness, receiver,
                                                            postgres_url, pg_schema):
    h = await make_harness(env={"COURIER_DB": postgres_url, "COURIER_DB_SCHEMA": pg_schema})
    status, body = await h.post(model_free(), "pg1")
    assert status == 202 and body["state"] == "queued"
    final = await h.wait_final("pg1")
    assert final["state"] == "success"
    assert "subfolder=courier%2Fpg1&type=output" in final["image_url"]  # the node's own file
    [callback] = await receiver.wait_for(1)
    assert callback.json["status"] == "success"
    await h.settle()
    assert (await h.status("pg1"))["callback"]["state"] == "delivered"
    assert (await h.post(model_free(), "pg1"))[0] == 200  # replay from the database
    health = await h.courier.health()
    assert health["journal"] == "postgres"


async def test_a_courier_started_before_its_database_waits_for_it(tmp_path, monkeypatch,
                                                                  postgres_url, receiver):
    from comfy_courier import wiring
    from comfy_courier.executor import courier as courier_module

    from conftest import base_env
    from pgcluster import Cluster, find_bindir, free_port
    from standin.comfy import StandinComfy

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("needs the PostgreSQL binaries to start a server late")
    monkeypatch.setattr(courier_module, "START_RETRY", (0.05, 0.2))
    port = free_port()
    environ = {**base_env(receiver, tmp_path),
               "COURIER_DB": f"postgresql://postgres@127.0.0.1:{port}/postgres"}
    comfy = StandinComfy(tmp_path / "comfy")
    courier = wiring.build_courier(Settings.from_env(environ), comfy.adapter())
    started = asyncio.ensure_future(courier.start())
    cluster = Cluster(bindir, port=port)
    try:
        await asyncio.sleep(0.3)
        assert not courier.ready.is_set() and not started.done()
        await asyncio.to_thread(cluster.start)
        await asyncio.wait_for(started, 30)
        assert courier.ready.is_set() and not courier.twin
        assert await courier.store.count_unfinished() == 0
    finally:
        started.cancel()
        await courier.stop()
        await courier.store.aclose()
        await asyncio.to_thread(cluster.remove)


async def test_two_hosts_admitting_one_id_at_once_accept_one_attempt(make_store):
    """The one-statement admission meets a concurrent insert of the same attempt: it is
    left out and decided again under the id's lock, as a replay of the other's."""
    one, two = make_store(), make_store()
    await admitted(one, job("warm", "pw"))  # both connected: the race is on the insert
    await two.latest("warm")
    for n in range(30):
        results = await asyncio.gather(
            one.admit(job(f"race{n}", f"a{n}"), lambda r: r, lambda _: None),
            two.admit(job(f"race{n}", f"b{n}", instance="b:1"), lambda r: r, lambda _: None),
        )
        assert sorted(type(r).__name__ for r in results) == ["Job", "int"], results
        [winner] = [r for r in results if isinstance(r, int)]
        [replay] = [r for r in results if isinstance(r, Job)]
        assert winner == replay.attempt == 1
    assert await one.count_unfinished() == 31


# -- waiting jobs and claims ----------------------------------------------------------


def waiting(cid: str, at: float) -> Job:
    new = job(cid, f"p-{cid}", instance="")
    new.epoch, new.created_at = 0, at
    return new


async def test_hosts_claim_waiting_jobs_oldest_first_each_job_once(make_store):
    one, two = make_store(), make_store()
    for cid, at in (("late", 3.0), ("early", 1.0), ("middle", 2.0)):
        await admitted(one, waiting(cid, at))
    assert await one.count_waiting() == 3 and await one.waiting_ahead(3.0) == 2
    assert await one.unfinished("a:1") == []  # nobody's until claimed
    claims = await asyncio.gather(one.claim("a:1", 1), two.claim("b:1", 1))
    taken = sorted(j.content_request_id for jobs, _ in claims for j in jobs)
    assert taken == ["early", "middle"]  # never the same one twice
    [(jobs, left)] = [c for c in claims if c[0][0].content_request_id == "early"]
    assert jobs[0].instance in ("a:1", "b:1") and jobs[0].epoch == 1 and left in (1, 2)
    rest, left = await one.claim("a:1", 5)
    assert [j.content_request_id for j in rest] == ["late"] and left == 0
    assert await one.claim("a:1", 5) == ([], 0)
    # a waiting job's epoch is 0: a cancel written with it loses to a claim
    assert not await one.set_state("p-late", JobState.RUNNING, epoch=0)


async def test_a_released_job_waits_again_at_its_old_place(make_store):
    store = make_store()
    await admitted(store, waiting("old", 1.0))
    [claimed], _ = await store.claim("a:1", 1)
    await admitted(store, waiting("new", 2.0))
    await store.record_image(claimed, 1, Output("9", 0, "old/1-1.jpg", "image/jpeg", 1, 1, 1))
    assert await store.released("p-old", "p-old-2", 5.0) == 2
    latest = await store.latest("old")
    assert (latest.instance, latest.prompt_id, latest.runs, latest.epoch) == (
        "", "p-old-2", 2, 2)
    assert await store.images("old", 1) == []
    [again], _ = await store.claim("b:1", 1)  # before the newer job: oldest first
    assert again.content_request_id == "old" and again.epoch == 3
    assert await store.released("nope", "x", 5.0) is None
    assert await store.live_hosts(10.0, 5.0) == 0
    await store.heartbeat("a:1", 9.0)
    assert await store.live_hosts(10.0, 5.0) == 1


async def test_hosts_hear_of_waiting_jobs_and_of_cancels_for_them(make_store):
    listener, sender = make_store(), make_store()
    heard: list[tuple[str, str]] = []
    task = asyncio.ensure_future(listener.listen(lambda kind, arg: heard.append((kind, arg))))
    try:
        while ("reconnected", "") not in heard:
            await asyncio.sleep(0.01)
        await admitted(sender, waiting("w", 1.0))
        [claimed], _ = await sender.claim("gpu 7", 1)
        assert await sender.request_cancel("w", 1)
        while len(heard) < 3:
            await asyncio.sleep(0.01)
        assert heard == [("reconnected", ""), ("job", ""), ("cancel", "gpu 7")]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_listener_reconnects_and_says_notices_may_be_lost(make_store, postgres_url,
                                                                    pg_schema, monkeypatch):
    from comfy_courier.executor.store.postgres import fleet

    monkeypatch.setattr(fleet, "LISTEN_RETRY", (0.01, 0.05))
    listener = make_store(f"{postgres_url}?application_name=listen_{pg_schema}")
    heard: list[str] = []
    task = asyncio.ensure_future(listener.listen(lambda kind, arg: heard.append(kind)))
    try:
        while heard != ["reconnected"]:
            await asyncio.sleep(0.01)
        sql(postgres_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s", f"listen_{pg_schema}")
        while heard.count("reconnected") < 2:
            await asyncio.sleep(0.01)
        await admitted(make_store(), waiting("after", 1.0))
        while "job" not in heard:
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_admission_whose_connection_breaks_fails_and_asks_for_a_rescan(
        make_store, postgres_url, pg_schema):
    store = make_store(f"{postgres_url}?application_name=adm_{pg_schema}")
    lost: list[str] = []
    store.on_lost = lambda: lost.append("rescan")
    await admitted(store, job("before", "p0"))
    await store.latest("before")  # every pooled connection has been used
    sql(postgres_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = %s", f"adm_{pg_schema}")
    outcomes = []
    for n in range(4):  # a broken pooled connection fails its call (it may have committed)
        try:
            outcomes.append(await store.admit(job(f"after{n}", f"pa{n}"), lambda r: r,
                                              lambda _: None))
        except StoreError:
            outcomes.append("503")
        await asyncio.sleep(0)
    assert "503" in outcomes and outcomes[-1] == 1  # then a fresh connection admits
    assert lost and set(lost) == {"rescan"}
