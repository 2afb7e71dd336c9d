"""Every accepted job ends in exactly one final callback: the outcomes, end to end."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from standardwebhooks import Webhook

from comfy_courier.executor.admission import Admission

from conftest import API_KEY, SERVICE_KEY, WEBHOOK_SECRET, model_free
from standin.comfy import image_metadata

CONTRACT_KEYS = ["content_request_id", "status", "image_url", "error_message"]


def with_node(workflow: dict, node_id: str, class_type: str, **inputs) -> dict:
    workflow = dict(workflow)
    workflow[node_id] = {"class_type": class_type, "inputs": inputs}
    return workflow


def slow_workflow(seconds: float, blocking: bool = False) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}},
        "5": {"class_type": "BlockingNode" if blocking else "SlowNode",
              "inputs": {"images": ["1", 0], "seconds": seconds}},
        "2": {"class_type": "SaveAndCallback", "inputs": {"images": ["5", 0]}},
    }


async def final_callbacks(h, cid: str, count: int = 1) -> list[dict]:
    await h.receiver.wait_for(count)
    await h.settle()
    return h.receiver.bodies(cid)


@pytest.mark.parametrize("version", ["0.3.64", "0.33.0"])
async def test_success_callback_shape_on_both_queue_shapes(make_harness, tmp_path, version):
    h = await make_harness(version=version)
    status, accepted = await h.post(model_free(), "ok1")
    assert status == 202
    [body] = await final_callbacks(h, "ok1")
    assert list(body)[:4] == CONTRACT_KEYS
    assert body["status"] == "success" and body["error_message"] is None
    assert body["image_urls"] == [body["image_url"]]
    assert body["attempt"] == 1 and body["prompt_id"] == accepted["prompt_id"]
    assert body["outputs"][0]["width"] == 64 and body["outputs"][0]["height"] == 48
    # local storage serves the node's own file through /view: no copy under courier/
    query = parse_qs(urlsplit(body["image_url"]).query)
    stored = tmp_path / "comfy" / "output" / query["subfolder"][0] / query["filename"][0]
    output = tmp_path / "comfy" / "output"
    assert stored.exists() and [p for p in output.rglob("*") if p.is_file()] == [stored]
    assert image_metadata(stored.read_bytes()) == {}
    assert h.comfy.worker_alive, "the queue item shape must not kill ComfyUI's worker"
    history = h.comfy.prompt_queue.get_history(accepted["prompt_id"])[accepted["prompt_id"]]
    assert history["prompt"][3]["client_id"] == "comfy-courier"
    assert len(history["prompt"]) == 5  # 0.33 strips `sensitive` through process_item


async def test_execution_error_is_one_error_callback_with_node(make_harness):
    h = await make_harness()
    workflow = with_node(model_free(), "3", "FailingNode", message="the GPU caught fire")
    workflow["4"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}}
    status, _ = await h.post(workflow, "err1")
    assert status == 202
    [body] = await final_callbacks(h, "err1")
    assert body["status"] == "error" and body["image_url"] is None
    assert body["error_type"] == "execution" and body["node_id"] == "3"
    assert "the GPU caught fire" in body["error_message"]
    assert (await h.status("err1"))["state"] == "error"


async def test_saveimage_workflow_delivers_stripped_images(make_harness, storage_server):
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
                                "COURIER_KEEP_OUTPUTS": "1"})  # to read SaveImage's own file
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "s"}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    await h.post(workflow, "plain1")
    [body] = await final_callbacks(h, "plain1")
    assert body["status"] == "success", body
    assert len(body["image_urls"]) == 2  # the batch; never the temp preview
    async with httpx.AsyncClient() as client:
        for url in body["image_urls"]:
            resp = await client.get(url)
            assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
            assert image_metadata(resp.content) == {}, "workflow metadata leaked"
    on_disk = next((h.comfy.folder_paths.output_directory and
                    Path(h.comfy.folder_paths.output_directory)).glob("s_*.png"))
    assert "prompt" in image_metadata(on_disk.read_bytes())  # SaveImage's own file keeps it


async def test_supabase_upload_is_upserted_and_url_downloads(make_harness, storage_server):
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    storage_server.state.fail_next(1, status=503)
    await h.post(model_free(), "sb1")
    [body] = await final_callbacks(h, "sb1")
    assert body["status"] == "success", body
    assert body["image_url"].endswith("/storage/v1/object/public/comfy-outputs/sb1/1-1.jpg")
    uploads = storage_server.state.uploads
    assert len(uploads) == 2 and all(u.upsert for u in uploads)
    async with httpx.AsyncClient() as client:
        resp = await client.get(body["image_url"])
    assert resp.status_code == 200 and resp.content[:3] == b"\xff\xd8\xff"  # JPEG, the default


async def test_signed_urls(make_harness, storage_server):
    storage_server.state.buckets["comfy-outputs"].public = False
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
                                "COURIER_URL_MODE": "signed"})
    await h.post(model_free(), "sig1")
    [body] = await final_callbacks(h, "sig1")
    assert "token=" in body["image_url"]
    async with httpx.AsyncClient() as client:
        assert (await client.get(body["image_url"])).status_code == 200


async def test_upload_that_keeps_failing_ends_in_error_not_success(make_harness, storage_server):
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    storage_server.state.fail_next(10, status=503)
    await h.post(model_free(), "up1")
    [body] = await final_callbacks(h, "up1")
    assert body["status"] == "error" and body["error_type"] == "upload"
    assert body["image_url"] is None and body["image_urls"] == []
    assert storage_server.state.upload_count == 3  # first try + the two retries of the schedule


async def test_permanent_storage_error_is_not_retried(make_harness, storage_server):
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
                                "COURIER_BUCKET": "missing-bucket"})
    await h.post(model_free(), "up2")
    [body] = await final_callbacks(h, "up2")
    assert body["error_type"] == "upload" and "404" in body["error_message"]
    assert storage_server.state.upload_count == 1


async def test_cancel_queued_job(make_harness):
    h = await make_harness(start_worker=False)
    await h.post(model_free(), "cq1")
    resp = await h.client.delete("/execute-workflow/cq1", headers={"X-API-Key": API_KEY})
    assert resp.status == 202
    body = await resp.json()
    assert body["state"] == "error" and "cancel" in body["error_message"]
    assert h.comfy.prompt_queue.get_tasks_remaining() == 0
    [cb] = await final_callbacks(h, "cq1")
    assert cb["error_type"] == "cancelled"
    resp = await h.client.delete("/execute-workflow/cq1", headers={"X-API-Key": API_KEY})
    assert resp.status == 409


async def test_cancel_running_job_interrupts_it(make_harness):
    h = await make_harness()
    await h.post(slow_workflow(5), "cr1")
    await h.wait_state("cr1", "running")
    resp = await h.client.delete("/execute-workflow/cr1", headers={"X-API-Key": API_KEY})
    assert resp.status == 202
    [cb] = await final_callbacks(h, "cr1")
    assert cb["status"] == "error" and cb["error_type"] == "cancelled"


async def submit_directly(h, cid: str) -> dict:
    """Courier.submit without HTTP: the caller resumes before the job is put on the queue."""
    from comfy_courier.executor.intake import parse_request

    raw = json.dumps({"workflow_json": model_free(), "content_request_id": cid}).encode()
    status, body = await h.courier.submit(parse_request(raw))
    assert status == 202
    return body


async def test_cancel_between_answer_and_queue_never_runs_the_job(make_harness):
    h = await make_harness(start_worker=False)
    held = []
    h.courier.admission.put = lambda *args: held.append(args)  # the put, after the 202
    body = await submit_directly(h, "cu1")
    assert body["queue_position"] == 0
    assert (await h.courier.status("cu1"))["queue_position"] == 0
    cancelled = await h.courier.cancel("cu1")
    assert cancelled["state"] == "error" and "before it ran" in cancelled["error_message"]
    [args] = held
    Admission.put(h.courier.admission, *args)  # the deferred put, now too late
    assert h.comfy.prompt_queue.get_tasks_remaining() == 0
    [cb] = await final_callbacks(h, "cu1")
    assert cb["error_type"] == "cancelled"


async def test_queue_watch_does_not_take_an_answered_job_for_a_removed_one(make_harness):
    h = await make_harness()
    await submit_directly(h, "uw1")
    assert h.comfy.prompt_queue.get_tasks_remaining() == 0  # answered, not queued yet
    await h.courier.watch_once()
    [cb] = await final_callbacks(h, "uw1")
    assert cb["status"] == "success"


async def test_comfyui_refusing_an_answered_job_ends_it_in_one_error_callback(make_harness):
    h = await make_harness(start_worker=False)

    def refuse(item):
        raise RuntimeError("ComfyUI is shutting down")

    h.comfy.prompt_queue.put = refuse
    status, body = await h.post(model_free(), "rf1")
    assert status == 202
    [cb] = await final_callbacks(h, "rf1")
    assert cb["error_type"] == "lost" and "shutting down" in cb["error_message"]
    assert (await h.status("rf1"))["state"] == "error"


async def test_a_put_that_fails_after_queueing_takes_the_job_back(make_harness):
    h = await make_harness(start_worker=False)
    put = h.comfy.prompt_queue.put

    def queue_then_fail(item):
        put(item)
        raise RuntimeError("queue_updated failed")

    h.comfy.prompt_queue.put = queue_then_fail
    status, _ = await h.post(model_free(), "rf2")
    assert status == 202
    [cb] = await final_callbacks(h, "rf2")
    assert cb["error_type"] == "lost"
    assert h.comfy.prompt_queue.get_tasks_remaining() == 0  # it will not run after all


async def test_a_failed_put_whose_take_back_fails_too_is_still_lost(make_harness):
    h = await make_harness(start_worker=False)
    queue = h.comfy.prompt_queue
    put, delete = queue.put, queue.delete_queue_item

    def queue_then_fail(item):
        put(item)
        raise RuntimeError("queue_updated failed")

    def delete_then_fail(match):  # ComfyUI's delete_queue_item calls queue_updated too
        delete(match)
        raise RuntimeError("queue_updated failed")

    queue.put, queue.delete_queue_item = queue_then_fail, delete_then_fail
    assert (await h.post(model_free(), "rf3"))[0] == 202
    [cb] = await final_callbacks(h, "rf3")
    assert cb["error_type"] == "lost" and queue.get_tasks_remaining() == 0


async def test_interrupt_from_the_ui_is_reported(make_harness):
    h = await make_harness()
    await h.post(slow_workflow(5), "int1")
    await h.wait_state("int1", "running")
    h.comfy.interrupt_processing(True)  # what ComfyUI's /interrupt does
    [cb] = await final_callbacks(h, "int1")
    assert cb["error_type"] == "interrupted"


async def test_job_deleted_from_comfy_queue_gets_cancelled_callback(make_harness):
    h = await make_harness(start_worker=False)
    _, body = await h.post(model_free(), "del1")
    h.comfy.prompt_queue.delete_queue_item(lambda item: item[1] == body["prompt_id"])
    [cb] = await final_callbacks(h, "del1")
    assert cb["error_type"] == "cancelled" and "removed from ComfyUI's queue" in cb["error_message"]


async def test_queue_wiped_from_outside(make_harness):
    h = await make_harness(start_worker=False)
    for cid in ("w1", "w2"):
        await h.post(model_free(), cid)
    h.comfy.prompt_queue.wipe_queue()
    await h.receiver.wait_for(2)
    await h.settle()
    assert sorted(b["content_request_id"] for b in h.receiver.bodies()) == ["w1", "w2"]


async def test_timeout_interrupts_and_reports_even_if_node_is_stuck(make_harness):
    h = await make_harness(env={"COURIER_JOB_TIMEOUT": "1"})
    await h.post(slow_workflow(3, blocking=True), "to1")
    [cb] = await final_callbacks(h, "to1")
    assert cb["error_type"] == "timeout"
    await asyncio.sleep(2.5)  # the stuck node finally returns: still one callback
    await h.settle()
    assert len(h.receiver.bodies("to1")) == 1


async def test_new_attempt_after_error(make_harness, storage_server):
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    storage_server.state.fail_next(3, status=503)  # attempt 1 cannot store its image
    await h.post(model_free(), "re1")
    assert (await h.wait_final("re1"))["error_type"] == "upload"
    status, body = await h.post(model_free(), "re1")
    assert status == 202 and body["attempt"] == 2
    final = await h.wait_final("re1")
    assert final["state"] == "success" and final["attempt"] == 2
    await h.receiver.wait_for(2)
    await h.settle()
    bodies = h.receiver.bodies("re1")
    assert [(b["attempt"], b["status"]) for b in bodies] == [(1, "error"), (2, "success")]
    assert bodies[1]["image_url"].endswith("/re1/2-1.jpg"), "a new attempt never reuses a URL"
    # the same id with another workflow is a conflict, even after an error
    status, body = await h.post(model_free(prefix="other"), "re1")
    assert status == 409 and body["error"]["type"] == "idempotency_conflict"


async def test_ui_run_uploads_under_ui_and_sends_no_callback(make_harness, storage_server):
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    # what ComfyUI's own /prompt does for a person in the UI: no courier job behind it
    h.comfy.prompt_queue.put((99, "ui-prompt-1", model_free(), {"client_id": "browser"},
                              ["2"]))
    for _ in range(200):
        if storage_server.state.upload_count:
            break
        await asyncio.sleep(0.01)
    assert storage_server.state.get("comfy-outputs", "ui/ui-prompt-1/2-1.jpg") is not None
    await h.settle()
    assert h.receiver.requests == []


async def test_signed_callbacks_verify_with_standardwebhooks(make_harness):
    h = await make_harness(env={"COURIER_WEBHOOK_SECRET": WEBHOOK_SECRET})
    await h.post(model_free(), "wh1")
    await h.receiver.wait_for(1)
    [request] = h.receiver.requests
    payload = Webhook(WEBHOOK_SECRET).verify(request.body, dict(request.headers))
    assert payload["content_request_id"] == "wh1"
    assert request.headers["webhook-id"].startswith("msg_")


async def test_callback_retries_until_receiver_recovers(make_harness):
    h = await make_harness()
    h.receiver.script = [(503, {}, 0.0), (500, {}, 0.0)]
    await h.post(model_free(), "rt1")
    await h.receiver.wait_for(3)
    await h.settle()
    ids = {r.headers["webhook-id"] for r in h.receiver.requests}
    assert len(ids) == 1, "one event, retried under the same webhook-id"
    assert (await h.status("rt1"))["callback"] == {"state": "delivered", "attempts": 3,
                                                    "last_error": None}


async def test_receiver_410_dead_letters_after_one_try(make_harness):
    h = await make_harness()
    h.receiver.script = [(410, {}, 0.0)]
    await h.post(model_free(), "dl1")
    await h.receiver.wait_for(1)
    await h.settle()
    callback = (await h.status("dl1"))["callback"]
    assert callback["state"] == "dead" and callback["attempts"] == 1
    assert "410" in callback["last_error"]
    await asyncio.sleep(0.2)
    await h.settle()
    assert len(h.receiver.requests) == 1


async def test_without_callback_url_jobs_still_run_for_polling(make_harness):
    h = await make_harness(with_receiver=False)
    await h.post(model_free(), "poll1")
    final = await h.wait_final("poll1")
    assert final["state"] == "success" and final["image_url"]
    assert final["callback"]["state"] == "none"


async def test_each_job_saves_into_a_folder_of_its_own(make_harness):
    # ComfyUI lists a save folder to number each file: one shared folder grows without end
    h = await make_harness()
    await h.post(model_free("shots/social"), "own-folder")
    assert (await h.wait_final("own-folder"))["state"] == "success"
    output = Path(h.comfy.folder_paths.get_output_directory())
    saved = [p.name for p in (output / "courier" / "own-folder" / "shots").iterdir()]
    assert saved == ["social_00001_.jpg"]


def test_job_prefix_puts_the_id_folder_before_the_file_name():
    from comfy_courier.nodes.save_and_callback import job_prefix

    # under courier/: with local storage the node's own file is what the URL serves
    assert job_prefix("social", "abc") == os.path.join("courier", "abc", "social")
    assert job_prefix("a/b/social", "abc") == os.path.join("courier", "abc", "a", "b", "social")
    assert job_prefix("../../social", "abc") == "../../social"  # ComfyUI refuses it
    assert job_prefix("social", "nul") == os.path.join("courier", "nul_.r", "social")  # no NUL/
    assert job_prefix("social", "COM1") == os.path.join("courier", "com1_.r7", "social")
    assert job_prefix("social", "lpt0") == os.path.join("courier", "lpt0_.r", "social")
    assert job_prefix("social", "Job1") != job_prefix("social", "job1")  # on any disk
