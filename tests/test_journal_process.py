"""The journal's child process: answers in order, errors as on a thread, and nothing left
hanging when the child dies, cannot start, or its parent goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfy_courier.executor.ids import uuid7
from comfy_courier.executor.intake import parse_request
from comfy_courier.executor.jobs import Job
from comfy_courier.executor.store import DuplicateAttempt
from comfy_courier.executor.store.sqlite import process as journal_process
from comfy_courier.executor.store.sqlite.journal import Journal
from comfy_courier.executor.store.sqlite.process import JournalProcess, JournalUnavailable

from conftest import API_KEY, model_free

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP/SIGKILL are POSIX")


def job(cid: str, prompt_id: str | None = None, instance: str = "host:8188") -> Job:
    return Job(content_request_id=cid, attempt=1, prompt_id=prompt_id or f"p-{cid}",
               instance=instance, workflow="{}", fingerprint="f", created_at=1.0)


async def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_calls_run_in_a_child_process_in_the_order_sent(tmp_path):
    db = JournalProcess(tmp_path / "j.sqlite3")
    inserts = [db.submit(Journal.insert, job(f"c{i}")) for i in range(200)]
    count = db.submit(Journal.count_unfinished)  # sent after the inserts: sees all of them
    assert await asyncio.gather(*inserts) == [None] * 200
    assert await count == 200
    assert db.pid not in (None, os.getpid()) and db.fallback is None
    assert (await db(Journal.latest, "c7")).prompt_id == "p-c7"
    await db.aclose()
    assert db.pid is None
    reopened = Journal(tmp_path / "j.sqlite3")  # what the child wrote is on disk
    assert reopened.count_unfinished() == 200
    reopened.close()


async def test_errors_reach_the_caller_with_their_type(tmp_path):
    db = JournalProcess(tmp_path / "j.sqlite3")
    await db(Journal.insert, job("dup"))
    with pytest.raises(DuplicateAttempt) as raised:
        await db(Journal.insert, job("dup"))
    assert "raised in the journal process" in "".join(getattr(raised.value, "__notes__", []))
    with pytest.raises((AttributeError, TypeError)):  # pickle: local functions are not sent
        await db(lambda journal: journal.count_unfinished())
    assert await db(Journal.count_unfinished) == 1  # the child is still serving
    await db.aclose()


async def test_a_child_killed_mid_call_fails_that_call_and_the_next_starts_anew(tmp_path):
    lost: list[str] = []
    db = JournalProcess(tmp_path / "j.sqlite3", on_lost=lambda: lost.append("lost"))
    await db(Journal.insert, job("before"))
    first = db.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)  # the call below is sent and never answered
    in_flight = db.submit(Journal.insert, job("during"))
    await asyncio.sleep(0.05)
    os.kill(first, signal.SIGKILL)
    with pytest.raises(JournalUnavailable):
        await in_flight
    assert lost == ["lost"]
    assert await db(Journal.count_unfinished) == 1  # a new child, the same journal
    assert db.pid not in (None, first)
    await db.aclose()


async def test_a_child_that_cannot_run_leaves_the_journal_on_a_thread(tmp_path, monkeypatch,
                                                                      caplog):
    crash = [sys.executable, "-c", "import sys; sys.exit(3)"]
    monkeypatch.setattr(journal_process, "child_command", lambda path: crash)
    db = JournalProcess(tmp_path / "j.sqlite3")
    with caplog.at_level(logging.WARNING):
        results = await asyncio.gather(db(Journal.insert, job("a")), db(Journal.count_unfinished))
    assert results == [None, 1]  # the calls the child took are run on the thread
    assert db.fallback is not None and "exited with code 3" in caplog.text
    assert await db(Journal.latest, "a") is not None
    await db.aclose()


async def test_no_executable_leaves_the_journal_on_a_thread(tmp_path, monkeypatch):
    missing = [str(tmp_path / "no-python-here")]
    monkeypatch.setattr(journal_process, "child_command", lambda path: missing)
    db = JournalProcess(tmp_path / "j.sqlite3")
    assert await db(Journal.count_unfinished) == 0
    assert db.fallback is not None
    await db.aclose()


async def test_close_answers_every_call_sent_then_refuses_more(tmp_path):
    db = JournalProcess(tmp_path / "j.sqlite3")
    await db(Journal.count_unfinished)
    pending = [db.submit(Journal.insert, job(f"z{i}")) for i in range(50)]
    await db.aclose()
    assert await asyncio.gather(*pending) == [None] * 50
    with pytest.raises(JournalUnavailable):
        await db(Journal.count_unfinished)


def test_the_child_exits_when_its_parent_closes_the_pipe(tmp_path):
    # ComfyUI dying closes the pipe just the same: the child never outlives it
    command = journal_process.child_command(str(tmp_path / "j.sqlite3"))
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None
    child.stdin.close()
    assert child.wait(timeout=20) == 0


def test_the_child_imports_the_journal_under_a_comfyui_style_package_name(tmp_path):
    # ComfyUI names a custom node package after its folder path; the top package's
    # __init__ (which registers ComfyUI nodes) must not run in the child
    root = str(Path(journal_process.__file__).resolve().parents[3])
    name = "/opt/ComfyUI/custom_nodes/comfy-courier"
    script = (
        "import sys, json\n"
        "sys.path.insert(0, sys.argv[1] + '/executor/store/sqlite')\n"
        "from journal_child import import_journal\n"
        "m = import_journal(sys.argv[2], sys.argv[1])\n"
        "j = m.Journal(sys.argv[3])\n"
        "print(json.dumps([m.__name__, j.count_unfinished(), 'comfy_courier' in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, root, name, str(tmp_path / "j.sqlite3")],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert json.loads(out.stdout) == [f"{name}.executor.store.sqlite.journal", 0, False]


async def test_a_job_committed_by_a_journal_process_that_died_still_runs(make_harness, receiver):
    h = await make_harness()
    # As if the child wrote this admission and died before answering: on the journal, not
    # on ComfyUI's queue, and its request got no 202.
    body = json.dumps({"workflow_json": model_free(), "content_request_id": "jl1"}).encode()
    request = parse_request(body)
    orphan = Job(content_request_id="jl1", attempt=1, prompt_id=str(uuid7()),
                 instance=h.courier.instance, workflow=request.canonical,
                 fingerprint=request.fingerprint, created_at=time.time())
    journal = Journal(h.settings.db_path)
    journal.insert(orphan)
    journal.close()

    db = h.courier.store.runner
    assert isinstance(db, JournalProcess) and db.pid is not None
    os.kill(db.pid, signal.SIGSTOP)
    status = asyncio.ensure_future(
        h.client.get("/execute-workflow/jl1", headers={"X-API-Key": API_KEY}))
    await wait_until(lambda: bool(db._inflight))
    os.kill(db.pid, signal.SIGKILL)
    resp = await status
    assert resp.status == 503 and (await resp.json())["error"]["type"] == "unavailable"

    final = await h.wait_final("jl1")
    assert final["state"] == "success" and final["attempt"] == 1
    await receiver.wait_for(1)
    await h.settle()
    assert [b["status"] for b in receiver.bodies("jl1")] == ["success"]


async def test_recoveries_that_overlap_queue_an_orphan_once(make_harness):
    # a lost journal process and the heartbeat's adoption can both start a recovery
    h = await make_harness(start_worker=False)
    body = json.dumps({"workflow_json": model_free(), "content_request_id": "twice"}).encode()
    request = parse_request(body)
    journal = Journal(h.settings.db_path)
    journal.insert(Job(content_request_id="twice", attempt=1, prompt_id=str(uuid7()),
                       instance=h.courier.instance, workflow=request.canonical,
                       fingerprint=request.fingerprint, created_at=time.time()))
    journal.close()
    await asyncio.gather(h.courier.recover(), h.courier.recover())
    assert h.comfy.prompt_queue.get_tasks_remaining() == 1
