"""A prompt queued through ComfyUI's own /prompt under a courier job's prompt_id is not that
job's run: it runs as an ordinary prompt, and the job's own run is what gets delivered.

ComfyUI has no auth and accepts a client-chosen `prompt_id`; its /queue shows the courier's
items in full. Everything an impostor copies from there (the id, the prompt, `extra_data`
with its `client_id`) must not make its completion or its saved images count for the job.
"""

from __future__ import annotations

import asyncio
import copy
import io
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conftest import API_KEY, SERVICE_KEY, Harness

ORANGE, BLUE = 0xFFA500, 0x0000FF


def job_workflow(output: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": ORANGE}},
        "2": {"class_type": output, "inputs": {"images": ["1", 0], "filename_prefix": "job"}},
    }


def slow_workflow(seconds: float) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "color": BLUE}},
        "5": {"class_type": "SlowNode", "inputs": {"images": ["1", 0], "seconds": seconds}},
        "2": {"class_type": "SaveAndCallback",
              "inputs": {"images": ["5", 0], "filename_prefix": "impostor"}},
    }


async def queued_items(h: Harness) -> dict[str, Any]:
    resp = await h.client.get("/queue")  # ComfyUI's own route: no key, shown in full
    assert resp.status == 200
    return dict(await resp.json())


async def post_prompt(h: Harness, prompt: dict[str, Any], prompt_id: str,
                      extra_data: dict[str, Any], front: bool = True) -> dict[str, Any]:
    body = {"prompt": prompt, "prompt_id": prompt_id, "front": front,
            "extra_data": copy.deepcopy(extra_data), "client_id": extra_data.get("client_id")}
    resp = await h.client.post("/prompt", json=body)
    assert resp.status == 200, await resp.text()
    answer = dict(await resp.json())
    assert answer["prompt_id"] == prompt_id
    return answer


def colour_and_size(data: bytes) -> tuple[tuple[int, int], tuple[int, ...]]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size, image.convert("RGB").getpixel((0, 0))


def is_orange(pixel: tuple[int, ...]) -> bool:
    return pixel[0] > 200 and 130 < pixel[1] < 200 and pixel[2] < 60  # JPEG moves it a little


def outbox_events(h: Harness, cid: str) -> int:
    assert h.settings.db_path is not None
    with sqlite3.connect(h.settings.db_path) as db:
        return int(db.execute("SELECT count(*) FROM outbox WHERE content_request_id = ?",
                              (cid,)).fetchone()[0])


async def queue_drained(h: Harness) -> None:
    for _ in range(1000):
        if h.comfy.prompt_queue.get_tasks_remaining() == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("ComfyUI's queue never drained")


@pytest.mark.parametrize("version", ["0.3.64", "0.33.0"])
@pytest.mark.parametrize("output", ["SaveAndCallback", "SaveImage"])
async def test_a_prompt_queued_under_a_waiting_jobs_id_is_not_its_run(
        make_harness, storage_server, version, output):
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
                                "COURIER_KEEP_OUTPUTS": "1"},  # both runs' files stay to look at
                           version=version, start_worker=False)
    status, accepted = await h.post(job_workflow(output), "imp1")
    assert status == 202
    prompt_id = accepted["prompt_id"]

    # The impostor copies the courier's item from /queue verbatim, changing only the image.
    [[_, shown_id, prompt, extra_data, _]] = (await queued_items(h))["queue_pending"]
    assert shown_id == prompt_id and extra_data["client_id"] == "comfy-courier"
    forged = copy.deepcopy(prompt)
    forged["1"]["inputs"].update(width=32, height=32, color=BLUE)
    await post_prompt(h, forged, prompt_id, extra_data)
    assert [item[1] for item in sorted(h.comfy.prompt_queue.queue)] == [prompt_id, prompt_id]
    assert sorted(h.comfy.prompt_queue.queue)[0][2]["1"]["inputs"]["color"] == BLUE  # first

    h.comfy.start(asyncio.get_running_loop())
    final = await h.wait_final("imp1")
    await queue_drained(h)
    await h.receiver.wait_for(1)
    await h.settle()

    assert final["state"] == "success", final
    [body] = h.receiver.bodies("imp1")
    assert body["status"] == "success" and body["prompt_id"] == prompt_id
    assert [(o["width"], o["height"]) for o in body["outputs"]] == [(64, 48)]
    # the job's key holds the job's own image; the impostor's never reached it
    key = "imp1/1-1.jpg" if output == "SaveAndCallback" else "imp1/1-1.png"
    assert [u.path for u in storage_server.state.uploads if u.path.startswith("imp1/")] == [key]
    stored = storage_server.state.get("comfy-outputs", key)
    assert stored is not None
    size, pixel = colour_and_size(stored.data)
    assert size == (64, 48) and is_orange(pixel), (size, pixel)
    assert outbox_events(h, "imp1") == 1
    # the impostor ran, as an ordinary prompt: its file is on disk, nothing of it was sent
    saved = [colour_and_size(p.read_bytes())[0]
             for p in Path(h.comfy.folder_paths.output_directory).rglob("job*")
             if p.is_file()]
    assert sorted(saved) == [(32, 32), (64, 48)]


async def test_an_impostor_running_first_neither_starts_nor_cancels_the_job(make_harness):
    # While a prompt under the job's id runs, the job is still waiting: its status says
    # queued, a DELETE takes the job's own item off the queue, and the impostor runs on.
    h = await make_harness(start_worker=False)
    _, accepted = await h.post(job_workflow("SaveAndCallback"), "imp2")
    prompt_id = accepted["prompt_id"]
    [[_, _, _, extra_data, _]] = (await queued_items(h))["queue_pending"]
    await post_prompt(h, slow_workflow(0.5), prompt_id, extra_data)

    h.comfy.start(asyncio.get_running_loop())
    for _ in range(1000):  # until the impostor runs
        if h.comfy.prompt_queue.currently_running:
            break
        await asyncio.sleep(0.005)
    running = list(h.comfy.prompt_queue.currently_running.values())
    assert [item[1] for item in running] == [prompt_id]
    await h.courier.watch_once()
    status = await h.status("imp2")
    assert status["state"] == "queued" and status["queue_position"] == 1

    resp = await h.client.delete("/execute-workflow/imp2", headers={"X-API-Key": API_KEY})
    assert resp.status == 202 and (await resp.json())["state"] == "error"
    assert h.comfy.prompt_queue.queue == []  # the job's own item, not the impostor
    assert [item[1] for item in h.comfy.prompt_queue.currently_running.values()] == [prompt_id]
    await queue_drained(h)
    await h.receiver.wait_for(1)
    await h.settle()
    assert [b["error_type"] for b in h.receiver.bodies("imp2")] == ["cancelled"]
    assert outbox_events(h, "imp2") == 1
    history = h.comfy.prompt_queue.get_history(prompt_id)[prompt_id]
    assert history["status"]["status_str"] == "success"  # the impostor ended as it would


async def test_an_impostor_queued_behind_the_running_job_is_not_delivered_again(make_harness):
    # The same id queued again while the job runs: the job ends once, with its own image;
    # the second prompt's images arrive after the job ended and are not sent.
    h = await make_harness(start_worker=False)
    workflow = slow_workflow(0.3)
    workflow["1"]["inputs"].update(width=64, height=48, color=ORANGE)
    _, accepted = await h.post(workflow, "imp3")
    prompt_id = accepted["prompt_id"]
    [[_, _, prompt, extra_data, _]] = (await queued_items(h))["queue_pending"]
    h.comfy.start(asyncio.get_running_loop())
    await h.wait_state("imp3", "running")
    forged = copy.deepcopy(prompt)
    forged["1"]["inputs"].update(width=32, height=32, color=BLUE)
    await post_prompt(h, forged, prompt_id, extra_data, front=False)

    final = await h.wait_final("imp3")
    await queue_drained(h)
    await h.receiver.wait_for(1)
    await h.settle()
    assert final["state"] == "success"
    [body] = h.receiver.bodies("imp3")
    assert [(o["width"], o["height"]) for o in body["outputs"]] == [(64, 48)]
    assert outbox_events(h, "imp3") == 1
    assert len(h.comfy.executed) == 6  # both prompts ran, 3 nodes each
