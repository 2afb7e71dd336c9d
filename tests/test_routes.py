"""Contract tests of the HTTP routes against the ComfyUI stand-in, with real loopback peers."""

from __future__ import annotations

import asyncio
import json
import select
import socket

import pytest

from conftest import API_KEY, model_free


def ui_format_workflow() -> dict:
    return {"last_node_id": 2, "nodes": [{"id": 1, "type": "EmptyImage"}], "links": [],
            "version": 0.4}


async def test_no_inbound_key_configured_fails_closed(make_harness):
    h = await make_harness(env={"COURIER_API_KEY": ""})
    status, body = await h.post(model_free(), "a1", key="anything")
    assert status == 503
    assert body["error"]["type"] == "not_configured"
    assert h.comfy.prompt_queue.get_tasks_remaining() == 0


@pytest.mark.parametrize("key", [None, "", "wrong-key-wrong-key"])
async def test_missing_or_wrong_key_is_401(make_harness, key):
    h = await make_harness()
    status, body = await h.post(model_free(), "a1", key=key)
    assert status == 401
    assert body == {"error": {"type": "unauthorized", "message": "missing or invalid X-API-Key"},
                    "node_errors": {}}


async def test_rotated_keys_are_all_accepted(make_harness):
    h = await make_harness(env={"COURIER_API_KEY": f"old-key-0123456789ab, {API_KEY}"})
    assert (await h.post(model_free(), "r1", key="old-key-0123456789ab"))[0] == 202
    assert (await h.post(model_free(), "r2", key=API_KEY))[0] == 202


async def test_body_over_limit_is_413_before_parsing(make_harness):
    h = await make_harness(env={"COURIER_MAX_BODY_MB": "0.01"})
    big = model_free()
    big["1"]["_meta"] = {"title": "x" * 20000}
    status, body = await h.post(big, "big1")
    assert status == 413
    assert body["error"]["type"] == "payload_too_large"


async def test_auth_is_checked_before_size(make_harness):
    h = await make_harness(env={"COURIER_MAX_BODY_MB": "0.01"})
    big = model_free()
    big["1"]["_meta"] = {"title": "x" * 20000}
    assert (await h.post(big, "big1", key="nope"))[0] == 401


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"content_request_id": "x"}).encode(), "workflow_json is required"),
        (json.dumps({"workflow_json": model_free()}).encode(), "content_request_id is required"),
        (json.dumps({"workflow_json": model_free(), "content_request_id": 5}).encode(),
         "content_request_id must be"),
        (json.dumps({"workflow_json": "{}", "content_request_id": "a"}).encode(),
         "non-empty JSON object"),
        (json.dumps({"workflow_json": {"1": 3}, "content_request_id": "a"}).encode(),
         "class_type"),
        (json.dumps({"workflow_json": model_free(), "content_request_id": "a",
                     "api_key": "x"}).encode(), "unknown field"),
    ],
)
async def test_malformed_bodies_are_400_with_reason(make_harness, raw, message):
    h = await make_harness()
    resp = await h.client.post("/execute-workflow", data=raw, headers={"X-API-Key": API_KEY})
    body = await resp.json()
    assert resp.status == 400, body
    assert message in body["error"]["message"]
    assert body["node_errors"] == {}
    assert h.comfy.prompt_queue.get_tasks_remaining() == 0


@pytest.mark.parametrize("cid", ["", "a/b", "a.b", "../x", "a:b", "x" * 129, "ünïcode"])
async def test_ids_that_are_not_safe_storage_paths_are_400(make_harness, cid):
    h = await make_harness()
    status, body = await h.post(model_free(), cid)
    assert status == 400
    assert body["error"]["field"] == "content_request_id"


async def test_ui_format_workflow_is_explained(make_harness):
    h = await make_harness()
    status, body = await h.post(ui_format_workflow(), "ui1")
    assert status == 400
    assert "API format" in body["error"]["message"]
    assert body["error"]["hint"] == "ui_format"


async def test_validation_failure_passes_node_errors_through_and_sends_nothing(make_harness):
    h = await make_harness()
    workflow = model_free()
    del workflow["2"]["inputs"]["images"]
    status, body = await h.post(workflow, "v1")
    assert status == 400
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["2"]["errors"][0]["type"] == "required_input_missing"
    assert h.comfy.prompt_queue.get_tasks_remaining() == 0
    resp = await h.client.get("/execute-workflow/v1", headers={"X-API-Key": API_KEY})
    assert resp.status == 404
    await h.settle()
    assert h.receiver.requests == []


async def test_partly_invalid_outputs_are_rejected_not_half_run(make_harness):
    h = await make_harness()
    workflow = model_free()
    workflow["3"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}
    status, body = await h.post(workflow, "half1")
    assert status == 400
    assert "3" in body["node_errors"]
    assert h.comfy.prompt_queue.get_tasks_remaining() == 0


async def test_unknown_node_type_is_400(make_harness):
    h = await make_harness()
    status, body = await h.post({"1": {"class_type": "NoSuchNode", "inputs": {}}}, "n1")
    assert status == 400
    assert body["error"]["type"] == "missing_node_type"


async def test_accepted_job_status_and_api_alias(make_harness):
    h = await make_harness(start_worker=False)
    status, body = await h.post(model_free(), "q1", path="/api/execute-workflow")
    assert status == 202
    assert body["state"] == "queued"
    assert body["queue_position"] == 0
    assert body["callback"]["state"] == "pending"
    assert set(body) >= {"content_request_id", "attempt", "prompt_id", "state", "queue_position",
                         "progress", "image_url", "image_urls", "error_message", "callback"}
    resp = await h.client.get("/api/execute-workflow/q1", headers={"X-API-Key": API_KEY})
    assert resp.status == 200
    assert (await resp.json())["prompt_id"] == body["prompt_id"]


async def test_queue_position_counts_the_whole_comfy_queue(make_harness):
    h = await make_harness(start_worker=False)
    accepted = [await h.post(model_free(), cid) for cid in ("p0", "p1", "p2")]
    assert [body["queue_position"] for _, body in accepted] == [0, 1, 2]
    assert [(await h.status(c))["queue_position"] for c in ("p0", "p1", "p2")] == [0, 1, 2]
    # a prompt queued through /prompt's path counts too
    h.comfy.prompt_queue.put((h.comfy.number, "ui-prompt", {}, {}, []))
    h.comfy.number += 1
    assert (await h.post(model_free(), "p3"))[1]["queue_position"] == 4


async def test_unknown_id_is_404(make_harness):
    h = await make_harness()
    resp = await h.client.get("/execute-workflow/nope", headers={"X-API-Key": API_KEY})
    assert resp.status == 404
    resp = await h.client.delete("/execute-workflow/nope", headers={"X-API-Key": API_KEY})
    assert resp.status == 404


async def test_duplicate_post_replays_without_running_again(make_harness):
    h = await make_harness()
    status, first = await h.post(model_free(), "d1")
    assert status == 202
    status, again = await h.post(model_free(), "d1")
    assert status == 200
    assert again["prompt_id"] == first["prompt_id"]
    await h.wait_final("d1")
    status, after = await h.post(model_free(), "d1")
    assert status == 200 and after["state"] == "success"
    await h.settle()
    assert len(h.receiver.bodies("d1")) == 1
    assert h.comfy.executed.count("2") == 1


async def test_duplicate_with_other_workflow_is_409(make_harness):
    h = await make_harness(start_worker=False)
    await h.post(model_free(), "c1")
    status, body = await h.post(model_free(prefix="other"), "c1")
    assert status == 409
    assert body["error"]["type"] == "idempotency_conflict"


async def test_concurrent_duplicates_run_once(make_harness):
    h = await make_harness(start_worker=False)
    results = await asyncio.gather(*(h.post(model_free(), "race1") for _ in range(10)))
    statuses = sorted(s for s, _ in results)
    assert statuses == [200] * 9 + [202]
    assert len({b["prompt_id"] for _, b in results}) == 1
    assert h.comfy.prompt_queue.get_tasks_remaining() == 1


async def test_queue_full_is_429_with_retry_after(make_harness):
    h = await make_harness(env={"COURIER_MAX_QUEUE": "2"}, start_worker=False)
    assert (await h.post(model_free(), "f1"))[0] == 202
    assert (await h.post(model_free(), "f2"))[0] == 202
    resp = await h.client.post("/execute-workflow", headers={"X-API-Key": API_KEY},
                               json={"workflow_json": model_free(), "content_request_id": "f3"})
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["type"] == "queue_full"
    # a duplicate of an accepted job is still answered while full
    assert (await h.post(model_free(), "f1"))[0] == 200


async def test_retry_after_follows_how_long_recent_jobs_ran(make_harness):
    h = await make_harness(env={"COURIER_MAX_QUEUE": "1"})
    await h.post(model_free(), "ra1")
    await h.wait_final("ra1")
    assert h.courier.runs.retry_after() == 1  # a model-free job ends within a second
    h.courier.runs.recent.extend([30.5, 41.2, 90.0])
    assert h.courier.runs.retry_after() == 36  # median of 4 runs (30.5 and 41.2), rounded up
    h.courier.runs.recent.extend([600.0] * 5)
    assert h.courier.runs.retry_after() == 60  # a client checks back at least once a minute
    h.comfy.stop()
    await h.post(model_free(), "ra2")
    resp = await h.client.post("/execute-workflow", headers={"X-API-Key": API_KEY},
                               json={"workflow_json": model_free(), "content_request_id": "ra3"})
    assert resp.status == 429 and resp.headers["Retry-After"] == "60"


async def test_queue_limit_holds_under_concurrent_posts(make_harness):
    h = await make_harness(env={"COURIER_MAX_QUEUE": "5"}, start_worker=False)
    results = await asyncio.gather(*(h.post(model_free(), f"c{i}") for i in range(20)))
    assert sorted(s for s, _ in results) == [202] * 5 + [429] * 15
    assert h.comfy.prompt_queue.get_tasks_remaining() == 5
    health = await (await h.client.get("/courier/health")).json()
    assert health["queue"]["courier_unfinished"] == 5


async def test_duplicate_rule_comes_before_validation(make_harness):
    h = await make_harness(start_worker=False)
    assert (await h.post(model_free(), "d1"))[0] == 202
    broken = model_free()
    del broken["2"]["inputs"]["images"]
    status, body = await h.post(broken, "d1")  # another workflow under the same id: 409, not 400
    assert status == 409 and body["error"]["type"] == "idempotency_conflict"
    assert h.comfy.prompt_queue.get_tasks_remaining() == 1


async def test_health_has_no_secrets(make_harness):
    h = await make_harness()
    resp = await h.client.get("/courier/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["ok"] is True and body["storage"] == "local" and body["journal"] == "process"
    text = json.dumps(body)
    for secret in h.settings.secrets:
        assert secret not in text
    assert h.courier.instance not in text  # SECURITY.md: no host or instance names


async def test_per_id_locks_do_not_accumulate(make_harness):
    h = await make_harness(start_worker=False)
    await asyncio.gather(*(h.post(model_free(), f"lk{i % 5}") for i in range(40)))
    assert len(h.courier.admission.id_locks) == 0


async def test_a_request_cancelled_while_its_row_commits_still_queues_the_job(make_harness):
    from comfy_courier.executor.intake import parse_request

    h = await make_harness(start_worker=False)
    raw = json.dumps({"workflow_json": model_free(), "content_request_id": "gone1"}).encode()
    submit = asyncio.ensure_future(h.courier.submit(parse_request(raw)))
    deadline = asyncio.get_running_loop().time() + 5
    while not h.courier.store._admit._writers:  # validated; its row is being written
        assert asyncio.get_running_loop().time() < deadline, "the row was never sent"
        await asyncio.sleep(0)
    submit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await submit
    while h.comfy.prompt_queue.get_tasks_remaining() == 0:
        assert asyncio.get_running_loop().time() < deadline, "the committed job never queued"
        await asyncio.sleep(0.01)
    status, body = await h.post(model_free(), "gone1")  # the client's retry: a replay
    assert status == 200 and body["state"] == "queued" and body["attempt"] == 1
    assert h.comfy.prompt_queue.get_tasks_remaining() == 1


async def test_the_202_is_written_before_the_job_wakes_comfyuis_worker(make_harness):
    # A put wakes ComfyUI's idle worker, which then holds the GIL for milliseconds: the
    # answer must already be on the wire (the client's socket readable) when it happens.
    h = await make_harness(start_worker=False)
    sock = socket.create_connection(("127.0.0.1", h.client.server.port))
    readable_at_put = []
    put = h.comfy.prompt_queue.put

    def watched_put(item):
        readable_at_put.append(bool(select.select([sock], [], [], 0)[0]))
        return put(item)

    h.comfy.prompt_queue.put = watched_put
    body = json.dumps({"workflow_json": model_free(), "content_request_id": "w202"}).encode()
    sock.sendall(
        b"POST /execute-workflow HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        + f"X-API-Key: {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while not readable_at_put:
            assert asyncio.get_running_loop().time() < deadline, "the job was never queued"
            await asyncio.sleep(0.001)
        assert readable_at_put == [True]
        assert sock.recv(65536).startswith(b"HTTP/1.1 202 ")
    finally:
        sock.close()
