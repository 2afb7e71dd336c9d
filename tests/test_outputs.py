"""What a job leaves in ComfyUI's output folder (issue 17, item 12)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import SERVICE_KEY, model_free

SAVE_IMAGE_ONLY = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "s"}},
}


def files(h) -> list[Path]:
    return sorted(p for p in Path(h.comfy.folder_paths.output_directory).rglob("*")
                  if p.is_file())


async def run(h, workflow, cid: str) -> dict:
    status, _ = await h.post(workflow, cid)
    assert status == 202
    final = await h.wait_final(cid)
    await h.receiver.wait_for(1)
    await h.settle()
    return final


@pytest.mark.parametrize("workflow", [model_free(), SAVE_IMAGE_ONLY], ids=["node", "saveimage"])
async def test_remote_storage_removes_a_jobs_files_once_it_ended(make_harness, storage_server,
                                                                  workflow):
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    final = await run(h, workflow, "clean1")
    assert final["state"] == "success" and final["image_urls"]
    for _ in range(200):  # removed in a thread just after the final commit
        if not files(h):
            break
        await asyncio.sleep(0.01)
    assert files(h) == []


async def test_keep_outputs_keeps_them(make_harness, storage_server):
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
                                "COURIER_KEEP_OUTPUTS": "1"})
    await run(h, model_free(), "keep1")
    assert len(files(h)) == 1


async def test_local_storage_delivers_the_nodes_own_file_not_a_copy(make_harness):
    h = await make_harness()
    final = await run(h, model_free(), "own1")
    [kept] = files(h)  # one file: the node's, served through /view
    query = parse_qs(urlsplit(final["image_url"]).query)
    assert kept.name == query["filename"][0] and query["type"] == ["output"]
    assert kept.parent.name == query["subfolder"][0].rpartition("/")[2]
