"""Steps of the wall clock (NTP correcting a wrong clock, a VM resumed, an operator's
`date -s`): durations are measured with a monotonic clock in the process, and wall-clock
times only where they are kept in the journal (see also test_delivery.py)."""

from __future__ import annotations

import asyncio
import time

from comfy_courier.executor import recovery as recovery_module
from comfy_courier.executor.store.sqlite.journal import Journal

from conftest import model_free
from test_job_outcomes import slow_workflow


async def test_a_wall_clock_step_forward_does_not_time_out_a_running_job(make_harness):
    h = await make_harness(env={"COURIER_JOB_TIMEOUT": "60"})
    await h.post(slow_workflow(30), "step1")
    await h.wait_state("step1", "running")
    watch = h.courier.watch
    watch.clock = lambda: time.time() + 7200  # the wall clock jumps two hours ahead
    await h.courier.watch_once()
    assert (await h.status("step1"))["state"] == "running"
    watch.monotonic = lambda: time.monotonic() + 61  # a minute really passes
    await h.courier.watch_once()
    final = await h.wait_final("step1")
    assert final["error_type"] == "timeout"


async def test_a_wall_clock_step_forward_pauses_adoption_of_siblings_that_look_silent(
        make_harness, tmp_path, monkeypatch):
    # On one host every process shares the wall clock: right after it steps an hour
    # ahead, a sibling's last heartbeat looks an hour old until it beats again. Adopting
    # then would run its jobs a second time.
    sibling = await make_harness(start_worker=False, port=8190)
    await sibling.post(model_free(), "sib1")
    live = await make_harness(start_worker=False, port=8191, base=tmp_path / "comfy2")
    recovery = live.courier.recovery
    wall, mono = [time.time()], [time.monotonic()]
    recovery.clock, recovery.monotonic = (lambda: wall[0]), (lambda: mono[0])
    beats = []
    real_heartbeat = live.courier.store.heartbeat

    async def heartbeat(instance, now):
        beats.append(now)
        await real_heartbeat(instance, now)

    monkeypatch.setattr(live.courier.store, "heartbeat", heartbeat)
    monkeypatch.setattr(recovery_module, "HEARTBEAT_MAX", 0.001)

    def owner() -> str:
        journal = Journal(live.settings.db_path)
        try:
            return journal.latest("sib1").instance
        finally:
            journal.close()

    async def until_beats(count: int) -> None:
        while len(beats) < count:
            await asyncio.sleep(0.001)

    keep_alive = asyncio.ensure_future(recovery.keep_alive())
    try:
        await until_beats(1)
        wall[0] += 3600  # the host's clock steps an hour ahead
        await until_beats(9)  # adoption was looked at on every beat
        assert owner() == sibling.courier.instance
        # the pause ends COURIER_TAKEOVER_AFTER later by the monotonic clock: a sibling
        # that still has not beaten by then (this one's clock was not stepped) is adopted
        wall[0] += live.settings.takeover_after + 1
        mono[0] += live.settings.takeover_after + 1
        await until_beats(17)
        assert owner() == live.courier.instance
    finally:
        keep_alive.cancel()
