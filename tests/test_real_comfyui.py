"""Opt-in: a real ComfyUI (COMFYUI_DIR) on CPU with this package loaded, driven over HTTP.

Set COMFYUI_DIR to a ComfyUI checkout whose Python has its requirements (COMFYUI_PYTHON, or
COMFYUI_DIR/.venv/bin/python, or this interpreter). txt2img needs the tiny checkpoint from
shared/tools/make_tiny_sd15.py in its models/checkpoints.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from conftest import API_KEY, CALLBACK_KEY, Receiver
from real_comfy import (
    COMFYUI_DIR,
    REPO,
    RealComfy,
    final_state,
    free_port,
    load,
    require_tiny_checkpoint,
    requires_comfyui,
    start_comfy,
    stop,
    wait_up,
)
from standin.comfy import image_metadata

pytestmark = requires_comfyui()


@pytest.fixture
async def real_comfy(tmp_path: Path, receiver: Receiver) -> AsyncIterator[RealComfy]:
    comfy = start_comfy(tmp_path, receiver.url, free_port(), {})
    try:
        await wait_up(comfy)
        yield comfy
    finally:
        stop(comfy)


def journal_processes(tmp_path: Path) -> list[int]:
    """Live journal child processes whose command line names a file under `tmp_path`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            continue  # a zombie has exited
        if any(b"journal_child.py" in a for a in cmdline) and any(
                str(tmp_path).encode() in a for a in cmdline):
            found.append(int(entry.name))
    return found


async def test_model_free_workflow_end_to_end(real_comfy, receiver):
    async with httpx.AsyncClient(timeout=30) as client:
        resp = await real_comfy.post(client, load("model-free.json"), "real-model-free")
        assert resp.status_code == 202, resp.text
        await receiver.wait_for(1, timeout=120)
        [callback] = receiver.requests
        assert callback.headers["X-API-Key"] == CALLBACK_KEY
        body = callback.json
        assert list(body)[:4] == ["content_request_id", "status", "image_url", "error_message"]
        assert body["status"] == "success", body
        image = await client.get(body["image_url"])
        # JPEG, the default
        assert image.status_code == 200 and image.content[:3] == b"\xff\xd8\xff"
        assert image_metadata(image.content) == {}
        # courier jobs never broadcast to browser tabs, and /queue, /history hold no secret
        history = (await client.get(f"{real_comfy.url}/history/{body['prompt_id']}")).text
        queue = (await client.get(f"{real_comfy.url}/queue")).text
        for secret in (API_KEY, CALLBACK_KEY):
            assert secret not in history and secret not in queue
        assert '"client_id": "comfy-courier"' in history or "comfy-courier" in history
        # the journal runs in its child process under ComfyUI's name for our package
        health = (await client.get(f"{real_comfy.url}/courier/health")).json()
        assert health["journal"] == "process", health


async def test_txt2img_end_to_end(real_comfy, receiver):
    require_tiny_checkpoint()
    async with httpx.AsyncClient(timeout=30) as client:
        for name, cid in (("txt2img-sd15.json", "real-txt2img"),
                          ("txt2img-sd15-saveimage.json", "real-saveimage")):
            resp = await real_comfy.post(client, load(name), cid)
            assert resp.status_code == 202, resp.text
        await receiver.wait_for(2, timeout=180)
        bodies = {b["content_request_id"]: b for b in receiver.bodies()}
        for cid in ("real-txt2img", "real-saveimage"):
            assert bodies[cid]["status"] == "success", bodies[cid]
            image = await client.get(bodies[cid]["image_url"])
            assert image.status_code == 200
            assert image_metadata(image.content) == {}, "prompt metadata leaked"


async def test_runtime_error_gives_exactly_one_error_callback(real_comfy, receiver):
    async with httpx.AsyncClient(timeout=30) as client:
        resp = await real_comfy.post(client, load("runtime-error.json"), "real-runtime-error")
        assert resp.status_code == 202, resp.text
        final = await final_state(client, real_comfy, "real-runtime-error")
        assert final["state"] == "error"
        await receiver.wait_for(1, timeout=60)
        await asyncio.sleep(1.0)  # anything else would have arrived by now
        bodies = receiver.bodies("real-runtime-error")
        assert [b["status"] for b in bodies] == ["error"]
        assert bodies[0]["error_type"] == "execution" and bodies[0]["node_id"] == "3"
        # ComfyUI's refusal names the folders; none leaves the host as a path of it
        message = bodies[0]["error_message"]
        assert "full_output_folder: output/../..\n" in message, message
        assert str(real_comfy.output.parent.parent) not in message
        assert str(Path(COMFYUI_DIR or "").resolve()) not in message


async def test_validation_errors_pass_through(real_comfy):
    workflow = load("model-free.json")
    workflow["1"]["inputs"]["width"] = "wide"
    async with httpx.AsyncClient(timeout=30) as client:
        resp = await real_comfy.post(client, workflow, "real-invalid")
        assert resp.status_code == 400
        assert "1" in resp.json()["node_errors"]
        # an unknown node type is named with its node (ComfyUI says only the first, by id)
        workflow = load("model-free.json")
        workflow["3"] = {"class_type": "NotInstalledNode", "inputs": {"images": ["1", 0]}}
        resp = await real_comfy.post(client, workflow, "real-missing-node")
        assert resp.status_code == 400
        body = resp.json()
        assert body["error"]["message"] == (
            "node 3: class_type 'NotInstalledNode' is not installed on this ComfyUI")
        assert list(body["node_errors"]) == ["3"]


async def test_the_shipped_examples_run(real_comfy, receiver):
    """examples/*.json as shipped (txt2img with the tiny checkpoint in place of a real one)."""
    require_tiny_checkpoint()
    examples = REPO / "examples"
    txt2img = json.loads((examples / "txt2img-sd15.json").read_text())
    txt2img["4"]["inputs"]["ckpt_name"] = "tiny_sd15_random.safetensors"
    txt2img["5"]["inputs"].update(width=64, height=64)
    txt2img["3"]["inputs"]["steps"] = 2
    async with httpx.AsyncClient(timeout=30) as client:
        for workflow, cid in ((json.loads((examples / "model-free.json").read_text()),
                               "real-example-1"), (txt2img, "real-example-2")):
            resp = await real_comfy.post(client, workflow, cid)
            assert resp.status_code == 202, resp.text
        for cid in ("real-example-1", "real-example-2"):
            assert (await final_state(client, real_comfy, cid))["state"] == "success"


async def test_sigkill_while_running_then_restart_loses_nothing(tmp_path, receiver):
    require_tiny_checkpoint()
    long_job = load("txt2img-sd15.json")
    long_job["3"]["inputs"]["steps"] = 150  # long enough to be killed mid-run
    port = free_port()
    comfy = start_comfy(tmp_path, receiver.url, port, {})
    try:
        await wait_up(comfy)
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await comfy.post(client, long_job, "kill-running")).status_code == 202
            queued = await comfy.post(client, load("model-free.json"), "kill-queued")
            assert queued.status_code == 202
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                state = (await client.get(f"{comfy.url}/execute-workflow/kill-running",
                                          headers={"X-API-Key": API_KEY})).json()["state"]
                if state == "running":
                    break
                await asyncio.sleep(0.05)
            assert state == "running"
    finally:
        stop(comfy, signal.SIGKILL)
    assert receiver.requests == []
    deadline = time.monotonic() + 10  # the journal process ends with its parent
    while journal_processes(tmp_path) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert journal_processes(tmp_path) == []

    restarted = start_comfy(tmp_path, receiver.url, port, {})  # same port: same instance
    try:
        await wait_up(restarted)
        await receiver.wait_for(2, timeout=240)
        await asyncio.sleep(1.0)
        bodies = {}
        for request in receiver.requests:
            bodies.setdefault(request.json["content_request_id"], set()).add(
                request.headers["webhook-id"])
        assert {cid: len(ids) for cid, ids in bodies.items()} == {"kill-running": 1,
                                                                  "kill-queued": 1}
        assert {r.json["status"] for r in receiver.requests} == {"success"}
    finally:
        stop(restarted)


async def test_progress_updates_from_a_real_sampler(tmp_path, receiver):
    require_tiny_checkpoint()
    workflow = load("txt2img-sd15.json")
    workflow["3"]["inputs"]["steps"] = 20
    comfy = start_comfy(tmp_path, receiver.url, free_port(),
                        {"COURIER_STATUS_URL": receiver.url, "COURIER_PROGRESS_INTERVAL": "0.1"})
    try:
        await wait_up(comfy)
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await comfy.post(client, workflow, "real-progress")).status_code == 202
            final = await final_state(client, comfy, "real-progress")
        assert final["state"] == "success"
        await asyncio.sleep(0.5)
        statuses = [r.json["status"] for r in receiver.requests]
        progress = [r.json["progress"] for r in receiver.requests if r.json["status"] == "running"]
        assert statuses[0] == "queued" and statuses[-1] == "success"
        assert any(p and p > 0 for p in progress), statuses
    finally:
        stop(comfy)


async def test_a_prompt_queued_under_a_jobs_id_is_not_delivered_as_the_job(real_comfy, receiver):
    # ComfyUI's own /prompt takes a client-chosen prompt_id, and /queue shows the courier's
    # item in full: a copy queued ahead of the waiting job runs as an ordinary prompt.
    require_tiny_checkpoint()
    from PIL import Image

    blocker = {  # runs until interrupted, so the job waits while the impostor is queued
        "4": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": "tiny_sd15_random.safetensors"}},
        "5": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler",
              "inputs": {"seed": 1, "steps": 10000, "cfg": 7.0, "sampler_name": "euler",
                         "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                         "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    job = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0xFFA500}},
        "2": {"class_type": "SaveAndCallback",
              "inputs": {"images": ["1", 0], "filename_prefix": "job"}},
    }
    async with httpx.AsyncClient(timeout=30) as client:
        url = real_comfy.url
        resp = await client.post(f"{url}/prompt", json={"prompt": blocker})
        assert resp.status_code == 200, resp.text
        deadline = time.monotonic() + 60
        while not (await client.get(f"{url}/queue")).json()["queue_running"]:
            assert time.monotonic() < deadline, "the blocker never started"
            await asyncio.sleep(0.05)
        resp = await real_comfy.post(client, job, "real-impostor")
        assert resp.status_code == 202, resp.text
        prompt_id = resp.json()["prompt_id"]

        [item] = (await client.get(f"{url}/queue")).json()["queue_pending"]
        assert item[1] == prompt_id
        forged = item[2]
        forged["1"]["inputs"].update(width=32, height=32, color=0x0000FF)
        resp = await client.post(f"{url}/prompt", json={
            "prompt": forged, "prompt_id": prompt_id, "front": True, "extra_data": item[3],
            "client_id": item[3].get("client_id")})
        assert resp.status_code == 200, resp.text
        pending = (await client.get(f"{url}/queue")).json()["queue_pending"]
        assert sorted((i[0], i[1]) for i in pending)[0][1] == prompt_id
        assert len(pending) == 2
        assert (await client.post(f"{url}/interrupt", json={})).status_code == 200

        final = await final_state(client, real_comfy, "real-impostor")
        assert final["state"] == "success", final
        await receiver.wait_for(1, timeout=60)
        deadline = time.monotonic() + 60
        while (await client.get(f"{url}/queue")).json()["queue_pending"]:
            assert time.monotonic() < deadline, "the queue never drained"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # a second delivery would have arrived by now
        [body] = receiver.bodies("real-impostor")
        assert body["status"] == "success" and body["prompt_id"] == prompt_id
        image = await client.get(body["image_url"])
        assert image.status_code == 200
        with Image.open(io.BytesIO(image.content)) as decoded:
            size, pixel = decoded.size, decoded.convert("RGB").getpixel((0, 0))
        assert size == (64, 48) and pixel[0] > 200 and pixel[2] < 60, (size, pixel)
        # the impostor ran as an ordinary prompt: its file is saved, nothing of it was sent
        sizes = []
        for path in real_comfy.output.rglob("job*"):
            with Image.open(path) as saved:
                sizes.append(saved.size)
        assert sorted(sizes) == [(32, 32), (64, 48)]
        assert "belong to no running courier job" in real_comfy.log.read_text()


async def test_openapi_document_is_served_under_both_paths(real_comfy):
    from comfy_courier.openapi import PATH, document

    async with httpx.AsyncClient(timeout=30) as client:
        for path in (PATH, "/api" + PATH):
            resp = await client.get(real_comfy.url + path)  # no key
            assert resp.status_code == 200, path
            assert resp.headers["content-type"].startswith("application/json")
            assert resp.json() == document()
            for secret in (API_KEY, CALLBACK_KEY):
                assert secret not in resp.text
