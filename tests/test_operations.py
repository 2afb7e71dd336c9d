"""Operations: intermediate status updates with progress, metrics, the UI's delivered-URL event."""

from __future__ import annotations

import asyncio

from comfy_courier.executor.store.sqlite.journal import Journal

from conftest import API_KEY, CALLBACK_KEY, model_free
from test_job_outcomes import slow_workflow


async def test_status_updates_queued_running_progress_never_after_final(make_harness, receiver):
    h = await make_harness(env={"COURIER_STATUS_URL": receiver.url,
                                "COURIER_PROGRESS_INTERVAL": "0.05"})
    await h.post(slow_workflow(0.6), "st1")
    final = await h.wait_final("st1")
    assert final["state"] == "success"
    await h.settle()
    await asyncio.sleep(0.2)  # anything still throttled would have gone by now
    bodies = [r.json for r in receiver.requests]
    statuses = [b["status"] for b in bodies]
    assert statuses[0] == "queued" and "running" in statuses
    assert statuses[-1] == "success", "the final callback is the last thing sent"
    assert statuses.count("success") == 1
    progress = [b["progress"] for b in bodies if b["status"] == "running"]
    assert progress == sorted(progress) and 0 < max(progress) <= 1
    # at most one update per interval while it ran (a loaded machine runs it longer)
    ran = bodies[-1]["timings"]["execution_ms"] / 1000
    assert len(progress) <= ran / 0.05 + 3, "throttled"
    for request in receiver.requests:
        assert request.headers["X-API-Key"] == CALLBACK_KEY
        assert request.headers["webhook-id"]
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == len(receiver.requests)


async def test_status_endpoint_down_never_delays_the_job(make_harness, receiver):
    h = await make_harness(env={"COURIER_STATUS_URL": "http://127.0.0.1:9/status"})
    await h.post(model_free(), "st2")
    assert (await h.wait_final("st2"))["state"] == "success"
    await receiver.wait_for(1)


async def test_metrics_need_a_key_and_count_outcomes(make_harness):
    h = await make_harness(env={"COURIER_METRICS_KEY": "metrics-key-0123456789"})
    assert (await h.client.get("/courier/metrics")).status == 401
    await h.post(model_free(), "m1")
    await h.wait_final("m1")
    await h.settle()
    for headers in ({"X-API-Key": API_KEY}, {"Authorization": "Bearer metrics-key-0123456789"}):
        resp = await h.client.get("/courier/metrics", headers=headers)
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'courier_jobs_final_total{error_type="",status="success"} 1.0' in text
    assert "courier_jobs_accepted_total 1.0" in text
    assert 'courier_callback_attempts_total{outcome="delivered"} 1.0' in text
    assert "courier_upload_bytes_total" in text and "courier_unfinished_jobs 0.0" in text
    assert "courier_job_duration_seconds_count 1.0" in text


async def test_ui_run_tells_the_browser_that_queued_it(make_harness):
    h = await make_harness(with_receiver=False)
    h.comfy.prompt_queue.put((50, "ui-p", model_free(), {"client_id": "browser-tab-1"}, ["2"]))
    for _ in range(300):
        if h.comfy.sent:
            break
        await asyncio.sleep(0.01)
    [(event, data, sid)] = h.comfy.sent
    assert event == "comfy-courier.images" and sid == "browser-tab-1"
    assert data["prompt_id"] == "ui-p" and data["node_id"] == "2" and len(data["urls"]) == 1


async def test_ui_run_upload_failure_is_shown_to_the_browser(make_harness):
    from conftest import SERVICE_KEY

    h = await make_harness(with_receiver=False,
                           env={"SUPABASE_URL": "http://127.0.0.1:9",
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    h.comfy.prompt_queue.put((51, "ui-f", model_free(), {"client_id": "tab-2"}, ["2"]))
    for _ in range(500):
        if h.comfy.sent:
            break
        await asyncio.sleep(0.01)
    [(event, data, sid)] = h.comfy.sent
    assert sid == "tab-2" and data["urls"] == [] and "unreachable" in data["error"]


async def finished_jobs(h, *cids: str) -> None:
    for cid in cids:
        await h.post(model_free(), cid)
        await h.wait_final(cid)
    await h.receiver.wait_for(len(cids))
    await h.settle()


def journal_count(h, query: str) -> int:
    journal = Journal(h.settings.db_path)
    try:
        return int(journal._db.execute(query).fetchone()[0])
    finally:
        journal.close()


async def test_retention_slims_old_jobs_and_keeps_their_outcome(make_harness):
    h = await make_harness()
    await finished_jobs(h, "old1", "new1")
    before = await h.status("old1")
    h.journal_sql("UPDATE jobs SET finished_at = finished_at - 31 * 86400"
                  " WHERE content_request_id = 'old1'")
    assert await h.courier.prune() == 1
    assert journal_count(h, "SELECT count(*) FROM jobs WHERE workflow = ''") == 1
    metrics = await h.client.get("/courier/metrics", headers={"X-API-Key": API_KEY})
    assert "courier_jobs_pruned_total 1.0" in await metrics.text()
    assert journal_count(h, "SELECT count(*) FROM outbox") == 1  # new1's
    after = await h.status("old1")  # the outcome stays
    assert after["state"] == "success" and after["image_urls"] == before["image_urls"]
    status, body = await h.post(model_free(), "old1")  # still a replay: nothing runs twice
    assert status == 200 and body["attempt"] == 1
    assert h.comfy.prompt_queue.get_tasks_remaining() == 0
    assert (await h.status("new1"))["state"] == "success"


async def test_an_id_retried_after_retention_goes_on_counting_attempts(make_harness):
    h = await make_harness()
    failing = dict(model_free(), **{
        "3": {"class_type": "FailingNode", "inputs": {}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
    })
    await h.post(failing, "err1")
    await h.wait_final("err1")
    h.journal_sql("UPDATE jobs SET finished_at = finished_at - 31 * 86400")
    await h.receiver.wait_for(1)
    await h.settle()
    assert await h.courier.prune() == 1
    status, body = await h.post(failing, "err1")  # its images would go to err1/2-<n>
    assert status == 202 and body["attempt"] == 2


async def test_pruning_runs_at_start_up(make_harness, tmp_path):
    first = await make_harness()
    await finished_jobs(first, "boot1")
    first.journal_sql("UPDATE jobs SET finished_at = finished_at - 31 * 86400")
    first.comfy.stop()  # the restart: its instance name is free for the next process
    second = await make_harness(base=tmp_path / "comfy2")
    deadline = asyncio.get_running_loop().time() + 5
    while journal_count(second, "SELECT count(*) FROM jobs WHERE workflow = ''") == 0:
        assert asyncio.get_running_loop().time() < deadline, "nothing was pruned at start-up"
        await asyncio.sleep(0.01)


async def test_retention_zero_keeps_finished_jobs_forever(make_harness):
    h = await make_harness(env={"COURIER_RETENTION_DAYS": "0"})
    await finished_jobs(h, "kept1")
    h.journal_sql("UPDATE jobs SET finished_at = finished_at - 3650 * 86400")
    assert await h.courier.prune() == 0
    assert journal_count(h, "SELECT count(*) FROM jobs WHERE workflow = ''") == 0
