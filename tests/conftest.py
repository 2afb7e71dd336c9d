"""Shared fixtures: real loopback peers (callback receiver, Supabase-Storage server) and a
courier wired to the ComfyUI stand-in exactly as `wiring.setup()` wires it into ComfyUI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from comfy_courier import wiring
from comfy_courier.executor.courier import Courier
from comfy_courier.executor.jobs import Job, JobState, callback_body
from comfy_courier.executor.settings import Settings
from comfy_courier.executor.store import OutboxEvent
from comfy_courier.executor.store.sqlite.journal import Journal
from comfy_courier.executor.store.sqlite.store import SqliteStore
from comfy_courier.executor.store.sqlite.thread import JournalThread
from comfy_courier.routes import add_routes

from conformance import Conformance
from fakes.storage_server import FakeStorage, start_storage_server
from pgcluster import Cluster, find_bindir
from standin.comfy import StandinComfy

API_KEY = "test-inbound-key-0123456789"
CALLBACK_KEY = "test-callback-key-abcdefghij"
SERVICE_KEY = "test-service-role-key-xyz"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WORKFLOWS = Path(__file__).resolve().parents[2] / "shared" / "workflows"


def model_free(prefix: str = "social") -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 16753920}},
        "2": {"class_type": "SaveAndCallback",
              "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


# -- PostgreSQL ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Any:
    """A PostgreSQL server for the session: COURIER_TEST_POSTGRES_URL, or a throwaway
    cluster started from the PostgreSQL binaries (PATH, or Debian's /usr/lib/postgresql)."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: pip install -e '.[test,postgres]' for the "
                    "PostgreSQL store's tests")
    url = os.environ.get("COURIER_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql; "
                    "Debian: apt-get install -y postgresql, or set COURIER_TEST_POSTGRES_URL")
    cluster = Cluster(bindir).start()
    yield cluster.url
    cluster.remove()


@pytest.fixture
def pg_schema(postgres_url: str) -> Any:
    """A schema of the test's own, dropped afterwards: tests share the server, not rows."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield schema
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# -- callback receiver -----------------------------------------------------------------


@dataclass
class Received:
    headers: CIMultiDict[str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A callback endpoint on loopback; `script` gives (status, headers, delay) per request."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    script: list[tuple[int, dict[str, str], float]] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    # every callback and status update is checked against the OpenAPI document's webhooks
    conformance: Conformance = field(default_factory=Conformance)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.conformance.check_webhook(request.headers, body)
        status, headers, delay = self.script.pop(0) if self.script else (200, {}, 0.0)
        # Recorded on arrival: a request whose answer comes too late still reached us.
        self.requests.append(Received(CIMultiDict(request.headers), body))
        async with self.arrived:
            self.arrived.notify_all()
        if delay:
            await asyncio.sleep(delay)
        return web.json_response({"ok": status < 300}, status=status, headers=headers)

    def bodies(self, cid: str | None = None) -> list[dict[str, Any]]:
        out = [r.json for r in self.requests]
        return [b for b in out if cid is None or b["content_request_id"] == cid]

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        async with self.arrived:
            await asyncio.wait_for(
                self.arrived.wait_for(lambda: len(self.requests) >= count), timeout)
        return self.requests


@contextlib.asynccontextmanager
async def serving_receiver() -> AsyncIterator[Receiver]:
    """A callback receiver on loopback; every callback it got must match the OpenAPI
    document."""
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/callback", recv.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    recv.url = str(server.make_url("/callback"))
    yield recv
    await server.close()
    assert not recv.conformance.violations, "callbacks that break the OpenAPI document"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serving_receiver() as recv:
        yield recv


# -- an outbox with one event ----------------------------------------------------------

# a real final callback body: the receiver checks what it gets against the OpenAPI document
BODY = json.dumps(callback_body(Job("d1", 1, "p1", "i", "{}", "f", state=JobState.SUCCESS,
                                    created_at=0.0))).encode()


async def journal_with_one_event(path: Path) -> JournalThread:
    """A journal (in a thread) holding job d1, finished, and its event msg_d1, undelivered."""
    db = JournalThread(lambda: Journal(path))
    job = Job("d1", 1, "p1", "i", "{}", "f", created_at=0.0)
    await db(Journal.insert, job)
    job.state, job.finished_at = JobState.SUCCESS, 0.0
    await db(Journal.finish, job, OutboxEvent("msg_d1", "d1", 1, BODY, 0, 0.0))
    return db


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    db = await journal_with_one_event(tmp_path / "d.sqlite3")
    yield SqliteStore(db)
    db.close()


# -- storage ---------------------------------------------------------------------------


@dataclass
class StorageServer:
    state: FakeStorage
    url: str


@pytest.fixture
async def storage_server() -> AsyncIterator[StorageServer]:
    state = FakeStorage(service_key=SERVICE_KEY)
    state.add_bucket("comfy-outputs", public=True)
    url, stop = await start_storage_server(state)
    yield StorageServer(state, url)
    await stop()


# -- the courier in a stand-in ComfyUI -------------------------------------------------


@dataclass
class Harness:
    comfy: StandinComfy
    courier: Courier
    client: TestClient
    settings: Settings
    receiver: Receiver | None
    conformance: Conformance
    starting: asyncio.Task[None] | None = None  # Courier.start(), while it stands by

    async def post(self, workflow: Any, cid: str, key: str | None = API_KEY,
                   path: str = "/execute-workflow") -> tuple[int, Any]:
        headers = {"X-API-Key": key} if key is not None else {}
        resp = await self.client.post(
            path, json={"workflow_json": workflow, "content_request_id": cid}, headers=headers)
        return resp.status, await resp.json()

    async def status(self, cid: str) -> dict[str, Any]:
        resp = await self.client.get(f"/execute-workflow/{cid}", headers={"X-API-Key": API_KEY})
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())

    async def wait_final(self, cid: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = await self.status(cid)
            if body["state"] in ("success", "error"):
                return body
            await asyncio.sleep(0.01)
        raise AssertionError(f"{cid} not final after {timeout} s: {body}")

    async def wait_state(self, cid: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = await self.status(cid)
            if body["state"] == state:
                return body
            await asyncio.sleep(0.005)
        raise AssertionError(f"{cid} never reached {state}: {body}")

    def journal_sql(self, statement: str, *params: Any) -> None:
        """Change the journal from outside, as another process sharing it would."""
        assert self.settings.db_path is not None
        journal = Journal(self.settings.db_path)
        try:
            journal._db.execute(statement, params)
        finally:
            journal.close()

    async def settle(self) -> None:
        """Let deliveries in flight finish (no sleeps: wait on the work itself)."""
        if self.courier.deliverer is not None:
            await self.courier.deliverer.dispatch_due()
            await self.courier.deliverer.drain()


HarnessFactory = Callable[..., Awaitable[Harness]]


def base_env(receiver: Receiver | None, tmp_path: Path) -> dict[str, str]:
    env = {"COURIER_API_KEY": API_KEY, "COURIER_DB": str(tmp_path / "journal.sqlite3"),
           "COURIER_PUBLIC_BASE_URL": "http://courier.test:8188"}
    if receiver is not None:
        env.update({"COURIER_CALLBACK_URL": receiver.url, "COURIER_CALLBACK_API_KEY": CALLBACK_KEY})
    return env


@pytest.fixture
async def make_harness(tmp_path: Path, receiver: Receiver) -> AsyncIterator[HarnessFactory]:
    """make_harness(env={...}, version="0.3.64", schedule=(0, 0.05), start=True).

    journal_thread=True: a test that patches `Journal` needs the journal in this process.
    """
    made: list[Harness] = []
    conformance = Conformance()  # every answer of every harness, against the OpenAPI document

    async def make(env: dict[str, str] | None = None, version: str = "0.3.64",
                   schedule: tuple[float, ...] = (0, 0.05, 0.1), with_receiver: bool = True,
                   base: Path | None = None, start_worker: bool = True,
                   upload_schedule: tuple[float, ...] = (0.01, 0.02), port: int = 8188,
                   journal_thread: bool = False) -> Harness:
        environ = base_env(receiver if with_receiver else None, tmp_path)
        environ.update(env or {})
        settings = Settings.from_env(environ)
        comfy = StandinComfy(base or tmp_path / "comfy", version=version, port=port)
        adapter = comfy.adapter()
        loop = asyncio.get_running_loop()
        courier = wiring.build_courier(settings, adapter, schedule=schedule, delivery_timeout=2.0,
                                       jitter=0.0, upload_schedule=upload_schedule,
                                       journal_thread=journal_thread)
        wiring._runtime = wiring.Runtime(settings, adapter, courier, loop)
        comfy.add_comfy_routes()  # ComfyUI's own /prompt, /queue, /history
        add_routes(comfy.routes, lambda: courier, settings)
        # In these tests comfy.stop() stands for the process dying: the kernel would then
        # release its instance lock (store.claim_instance), so a restart recovers its work.
        stop_comfy = comfy.stop

        def die() -> None:
            stop_comfy()
            courier.store.release_instance()

        comfy.stop = die  # type: ignore[method-assign]
        app = comfy.make_app()
        app.middlewares.append(conformance.middleware)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        if start_worker:
            comfy.start(loop)
        # start() returns once ready; a process whose instance name is taken stands by
        starting = asyncio.ensure_future(courier.start())
        deadline = loop.time() + 30
        while not (starting.done() or courier.twin):
            assert loop.time() < deadline, "the courier neither started nor stood by"
            await asyncio.sleep(0.005)
        if starting.done():
            starting.result()
        harness = Harness(comfy, courier, client, settings, receiver if with_receiver else None,
                          conformance, None if starting.done() else starting)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        if harness.starting is not None:
            harness.starting.cancel()
        harness.comfy.stop()
        await harness.courier.stop()
        await harness.client.close()
        await harness.courier.store.aclose()
    wiring._runtime = None
    assert not conformance.violations, "answers that break the OpenAPI document"
