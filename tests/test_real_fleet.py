"""Opt-in: three real ComfyUI processes (COMFYUI_DIR) with this package, on one PostgreSQL.

Each host has its own COURIER_INSTANCE and folders; they share the database (a throwaway
cluster from tests/pgcluster.py, or COURIER_TEST_POSTGRES_URL), one callback receiver and
one Supabase-Storage server (tests/fakes), as a fleet behind a load balancer would. Jobs
are tiny txt2img runs of the tiny SD1.5 checkpoint on CPU. The three hosts start once for
the module (a host a test killed is started again before the next test); each test checks
that every job it accepted got exactly one final event.

Needs what tests/test_real_comfyui.py needs, plus the PostgreSQL server binaries (or
COURIER_TEST_POSTGRES_URL) and psycopg in both Pythons: this one
(`pip install -e '.[test,postgres]'`) and ComfyUI's.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from conftest import API_KEY, SERVICE_KEY, Receiver, serving_receiver
from fakes.storage_server import FakeStorage, start_storage_server
from fleet_hosts import Fleet
from pgcluster import free_port
from real_comfy import (
    COMFYUI_DIR,
    RealComfy,
    comfy_python,
    load,
    require_tiny_checkpoint,
    requires_comfyui,
    start_comfy,
    stop,
)

pytestmark = [
    requires_comfyui("run three real ComfyUI hosts on one PostgreSQL"),
    pytest.mark.asyncio(loop_scope="module"),
]

TAKEOVER = "3"  # s of heartbeat silence before a host's jobs are taken over
BUCKET = "comfy-outputs"


def txt2img(steps: int, text: str = "a lighthouse") -> dict[str, Any]:
    """The tiny checkpoint at 64x64: ~0.1 s at 2 steps, ~60 ms per step more (one core)."""
    workflow = load("txt2img-sd15.json")
    workflow["3"]["inputs"]["steps"] = steps
    workflow["6"]["inputs"]["text"] = text
    return workflow


# -- the fleet -------------------------------------------------------------------------


class RealHost:
    """A real ComfyUI as one host of the fleet (the interface of fleet_hosts.Host)."""

    def __init__(self, index: int, folder: Path, env: dict[str, str]) -> None:
        self.index = index
        self.name = f"host-{index}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = folder / f"host{index}"
        self.env = {**env, "COURIER_INSTANCE": self.name}
        self.comfy: RealComfy = self._start()

    def _start(self) -> RealComfy:
        return start_comfy(self.base, self.env["COURIER_CALLBACK_URL"], self.port, self.env)

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.comfy.process

    @property
    def log(self) -> Path:
        return self.comfy.log

    def log_text(self) -> str:
        return self.comfy.log_text()

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.process.pid, sig)

    def restart(self) -> None:
        """Start it again after it died: same instance name, port and folders."""
        self.comfy = self._start()

    def stop(self) -> None:
        stop(self.comfy)


class RealFleet(Fleet):
    """fleet_hosts.Fleet over real ComfyUI hosts; adds where a prompt runs or ran."""

    def start(self, n: int) -> list[RealHost]:  # type: ignore[override]
        first = len(self.hosts) + 1
        new = [RealHost(i, self.folder, self.env) for i in range(first, first + n)]
        self.hosts += new  # type: ignore[arg-type]
        return new

    async def delete(self, index: int, cid: str) -> httpx.Response:
        return await self.client(index).delete(f"/execute-workflow/{cid}")

    async def running_on(self, prompt_id: str) -> list[int]:
        """The live hosts whose ComfyUI is executing this prompt now."""
        found = []
        for index, host in enumerate(self.hosts, start=1):
            if host.process.poll() is None:
                queue = (await self.client(index).get("/queue")).json()
                if any(item[1] == prompt_id for item in queue["queue_running"]):
                    found.append(index)
        return found

    async def wait_running_on(self, index: int, cid: str, timeout: float = 60.0) -> list[int]:
        """Wait until the job runs on some host's ComfyUI (asking host `index`); where."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            body = await self.wait_state(index, cid, "running", timeout=timeout)
            hosts = await self.running_on(body["prompt_id"])
            if hosts:
                return hosts
            assert asyncio.get_running_loop().time() < deadline, f"{cid} never on a queue"
            await asyncio.sleep(0.05)


async def settled(fleet: RealFleet, receiver: Receiver, ids: list[str],
                  timeout: float = 120.0) -> dict[str, list[dict[str, Any]]]:
    """Wait until each id has a final event and no event is pending anywhere in the fleet
    (nothing more will be sent); the events per id, each asserted to be exactly one."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        seen = {r.json["content_request_id"] for r in receiver.requests}
        if seen >= set(ids):
            live = next(i for i, h in enumerate(fleet.hosts, 1) if h.process.poll() is None)
            outbox = (await fleet.client(live).get("/courier/health")).json()["outbox"]
            if outbox["pending"] == 0:
                break
        assert asyncio.get_running_loop().time() < deadline, (
            f"final events missing: {sorted(set(ids) - seen)}")
        await asyncio.sleep(0.1)
    events: dict[str, set[str]] = defaultdict(set)
    bodies: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for request in receiver.requests:
        cid = request.json["content_request_id"]
        if cid in ids:
            events[cid].add(request.headers["webhook-id"])
            bodies[cid].append(request.json)
    assert {cid: len(events[cid]) for cid in ids} == {cid: 1 for cid in ids}, "one final each"
    return {cid: bodies[cid] for cid in ids}


async def assert_stored(storage: FakeStorage, body: dict[str, Any]) -> None:
    """Every image the callback names is in the bucket, a 64x64 JPEG, served at its URL."""
    from PIL import Image

    assert body["image_urls"] and body["image_url"] == body["image_urls"][0], body
    async with httpx.AsyncClient(timeout=30) as client:
        for url in body["image_urls"]:
            key = url.split(f"/object/public/{BUCKET}/", 1)[1]
            assert key.startswith(f"{body['content_request_id']}/"), key
            assert storage.get(BUCKET, key) is not None, f"{key} not in the bucket"
            served = await client.get(url)
            assert served.status_code == 200
            with Image.open(io.BytesIO(served.content)) as image:
                assert (image.format, image.size) == ("JPEG", (64, 64))


# -- fixtures: one fleet for the module ------------------------------------------------


@pytest.fixture(scope="module")
def fleet_schema(postgres_url: str) -> Iterator[str]:
    """The module's schema (dropped afterwards), once ComfyUI's Python can reach Postgres."""
    import psycopg

    python = comfy_python(Path(COMFYUI_DIR or ""))
    probe = subprocess.run([python, "-c", "import psycopg, psycopg_pool"],
                           capture_output=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"ComfyUI's Python lacks psycopg: {python} -m pip install "
                    "'psycopg[binary]>=3.2,<4' 'psycopg-pool>=3.2,<4'")
    schema = f"t_fleet_{uuid.uuid4().hex[:8]}"
    yield schema
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet_receiver() -> AsyncIterator[Receiver]:
    async with serving_receiver() as recv:
        yield recv
    events: dict[str, set[str]] = defaultdict(set)  # over the whole module, every test
    for request in recv.requests:
        events[request.json["content_request_id"]].add(request.headers["webhook-id"])
    assert all(len(ids) == 1 for ids in events.values()), events


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet_storage() -> AsyncIterator[tuple[FakeStorage, str]]:
    state = FakeStorage(service_key=SERVICE_KEY)
    state.add_bucket(BUCKET, public=True)
    url, stop_server = await start_storage_server(state)
    yield state, url
    await stop_server()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real_fleet(tmp_path_factory, postgres_url, fleet_schema, fleet_receiver,
                     fleet_storage) -> AsyncIterator[RealFleet]:
    require_tiny_checkpoint()
    _, storage_url = fleet_storage
    env = {
        "COURIER_DB": postgres_url, "COURIER_DB_SCHEMA": fleet_schema,
        "COURIER_TAKEOVER_AFTER": TAKEOVER, "COURIER_CALLBACK_URL": fleet_receiver.url,
        "COURIER_STORAGE": "supabase", "SUPABASE_URL": storage_url,
        "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY, "COURIER_BUCKET": BUCKET,
    }
    fleet = RealFleet(tmp_path_factory.mktemp("fleet"), env, API_KEY)
    try:
        fleet.start(3)  # together, on an empty schema
        await fleet.ready(timeout=240)
        yield fleet
    finally:
        await fleet.aclose()


@pytest_asyncio.fixture(loop_scope="module")
async def fleet(real_fleet: RealFleet) -> RealFleet:
    """The module's fleet with all three hosts up (one a test killed is started again)."""
    dead = [i for i, host in enumerate(real_fleet.hosts, 1) if host.process.poll() is not None]
    for index in dead:
        real_fleet.host(index).restart()  # type: ignore[attr-defined]
    await real_fleet.ready(timeout=240)
    return real_fleet


# -- the tests -------------------------------------------------------------------------


async def test_work_goes_to_idle_hosts_and_any_host_answers_for_any_job(
        fleet, fleet_receiver, fleet_storage):
    """A long job on host 1; short jobs POSTed to host 1 run on hosts 2 and 3 and end while
    it runs. With every host busy a job waits; GET and DELETE through another host reach
    the waiting job and the ones running elsewhere."""
    storage, _ = fleet_storage
    health = [(await fleet.client(i).get("/courier/health")).json() for i in (1, 2, 3)]
    assert [(h["journal"], h["fleet"]["hosts_live"]) for h in health] == [("postgres", 3)] * 3
    # started together on an empty schema: one of them migrated it
    assert sum("migrated from version 0" in h.log_text() for h in fleet.hosts) == 1
    long1 = await fleet.post(1, txt2img(2000, "long one"), "rf-long1")
    assert long1.status_code == 202, long1.text
    assert await fleet.wait_running_on(1, "rf-long1") == [1]  # an idle host takes its own

    shorts = [f"rf-short{i}" for i in range(6)]
    accepted = await asyncio.gather(*(fleet.post(1, txt2img(2, f"short {i}"), cid)
                                      for i, cid in enumerate(shorts)))
    assert [r.status_code for r in accepted] == [202] * 6, [r.text for r in accepted]
    for cid in shorts:
        assert (await fleet.wait_final(1, cid, timeout=120))["state"] == "success", cid
    # all six ended first, and none of them on the busy host
    assert [(await fleet.status(i, "rf-long1"))["state"] for i in (1, 2, 3)] == ["running"] * 3
    places = [await fleet.ran_on((await fleet.status(1, cid))["prompt_id"]) for cid in shorts]
    assert all(place in ([2], [3]) for place in places), places
    assert {p for place in places for p in place} == {2, 3}, places

    # every host busy: two more long jobs fill hosts 2 and 3, the next one waits
    for cid in ("rf-long2", "rf-long3"):
        assert (await fleet.post(1, txt2img(2000, cid), cid)).status_code == 202
    on = sorted([*await fleet.wait_running_on(1, "rf-long2"),
                 *await fleet.wait_running_on(1, "rf-long3")])
    assert on == [2, 3]
    waiting = await fleet.post(2, txt2img(2, "waits"), "rf-waiting")
    assert waiting.status_code == 202 and waiting.json()["state"] == "queued", waiting.text
    status = await fleet.status(3, "rf-waiting")
    assert status["state"] == "queued" and status["queue_position"] == 0, status
    assert (await fleet.delete(3, "rf-waiting")).status_code == 202
    final = await fleet.wait_final(1, "rf-waiting", timeout=30)
    assert (final["state"], final["error_type"]) == ("error", "cancelled"), final
    assert await fleet.ran_on(final["prompt_id"]) == []  # it never ran anywhere

    # each long job cancelled through a host that is not running it
    for cid, through in (("rf-long1", 3), ("rf-long2", 1), ("rf-long3", 1)):
        running = await fleet.status(through, cid)
        assert running["state"] == "running", running
        assert through not in await fleet.running_on(running["prompt_id"])
        assert (await fleet.delete(through, cid)).status_code == 202
    for cid in ("rf-long1", "rf-long2", "rf-long3"):
        final = await fleet.wait_final(2, cid, timeout=60)
        assert (final["state"], final["error_type"]) == ("error", "cancelled"), final

    ids = [*shorts, "rf-waiting", "rf-long1", "rf-long2", "rf-long3"]
    bodies = await settled(fleet, fleet_receiver, ids)
    for cid in shorts:
        [body] = bodies[cid]
        assert body["status"] == "success", body
        await assert_stored(storage, body)
    for cid in ("rf-waiting", "rf-long1", "rf-long2", "rf-long3"):
        assert [(b["status"], b["error_type"]) for b in bodies[cid]] == [("error", "cancelled")]


async def test_a_host_killed_mid_job_its_job_runs_again_on_another(
        fleet, fleet_receiver, fleet_storage):
    """kill -9 of host 1 while it samples: after COURIER_TAKEOVER_AFTER a live host runs
    the job again; it and the jobs around it each get exactly one final event."""
    storage, _ = fleet_storage
    assert (await fleet.post(1, txt2img(100, "victim"), "rf-victim")).status_code == 202
    assert await fleet.wait_running_on(1, "rf-victim") == [1]
    deadline = asyncio.get_running_loop().time() + 60
    while not (await fleet.status(1, "rf-victim"))["progress"]:  # sampling, mid-job
        assert asyncio.get_running_loop().time() < deadline, "the sampler never progressed"
        await asyncio.sleep(0.05)
    others = [f"rf-other{i}" for i in range(3)]
    for i, cid in enumerate(others):
        assert (await fleet.post(2, txt2img(2, f"other {i}"), cid)).status_code == 202

    fleet.host(1).signal(signal.SIGKILL)
    assert fleet.host(1).process.wait(timeout=30) == -signal.SIGKILL
    final = await fleet.wait_final(2, "rf-victim", timeout=120)
    assert final["state"] == "success" and final["attempt"] == 1, final
    assert await fleet.ran_on(final["prompt_id"]) in ([2], [3])
    for cid in others:
        assert (await fleet.wait_final(3, cid, timeout=60))["state"] == "success", cid
    health = (await fleet.client(2).get("/courier/health")).json()
    assert health["fleet"]["hosts_live"] == 2, health

    bodies = await settled(fleet, fleet_receiver, ["rf-victim", *others])
    for [body] in bodies.values():
        assert body["status"] == "success", body
        await assert_stored(storage, body)
    # the run on the new host wrote under its own claim's keys (`<id>/<attempt>_<epoch>-<n>`)
    [victim] = bodies["rf-victim"]
    assert victim["image_url"].endswith(".jpg") and "/rf-victim/1_" in victim["image_url"]
