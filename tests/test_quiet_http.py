"""The courier's own httpx requests stay out of the INFO log; everyone else's stay in it."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from comfy_courier.executor.jobs import Job
from comfy_courier.executor.quiet_http import QuietAsyncClient
from comfy_courier.executor.status_updates import StatusNotifier
from comfy_courier.executor.storage.supabase_storage import SupabaseStorage

from conftest import SERVICE_KEY, model_free


def httpx_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "httpx"]


@pytest.fixture
def info_log(caplog):
    """ComfyUI's default: the root logger at INFO."""
    caplog.set_level(logging.INFO)
    return caplog


async def test_uploads_log_nothing_from_httpx_at_info(storage_server, info_log):
    storage = SupabaseStorage(storage_server.url, SERVICE_KEY, "comfy-outputs")
    try:
        url = await storage.put("q1/1-1.jpg", b"\xff\xd8jpeg", "image/jpeg")
    finally:
        await storage.aclose()
    assert url.endswith("/object/public/comfy-outputs/q1/1-1.jpg")
    assert storage_server.state.upload_count == 1
    assert httpx_lines(info_log) == []


async def test_another_httpx_user_still_logs_at_info_even_at_the_same_moment(storage_server,
                                                                            info_log):
    storage = SupabaseStorage(storage_server.url, SERVICE_KEY, "comfy-outputs")
    try:
        async with httpx.AsyncClient() as other:  # another custom node's client
            await asyncio.gather(
                storage.put("q2/1-1.jpg", b"\xff\xd8jpeg", "image/jpeg"),
                other.get(f"{storage_server.url}/storage/v1/object/public/comfy-outputs/x"),
                storage.put("q2/1-2.jpg", b"\xff\xd8jpeg", "image/jpeg"),
            )
    finally:
        await storage.aclose()
    [line] = httpx_lines(info_log)
    assert line.startswith("HTTP Request: GET ") and "/object/public/comfy-outputs/x" in line


async def test_status_updates_log_nothing_from_httpx(receiver, info_log):
    notifier = StatusNotifier(receiver.url, None, ())
    notifier.update(Job("s1", 1, "p1", "i", "{}", "f", created_at=0.0), "queued", 0.0)
    await receiver.wait_for(1)
    assert httpx_lines(info_log) == []
    notifier.close(Job("s1", 1, "p1", "i", "{}", "f", created_at=0.0))


async def test_at_debug_the_couriers_requests_show_again(storage_server, caplog):
    caplog.set_level(logging.DEBUG)  # ComfyUI's --verbose DEBUG
    async with QuietAsyncClient() as client:
        await client.get(f"{storage_server.url}/storage/v1/bucket")
    assert any(line.startswith("HTTP Request: GET") for line in httpx_lines(caplog))


async def test_a_job_with_supabase_storage_logs_no_httpx_line(make_harness, storage_server,
                                                             info_log):
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    await h.post(model_free(), "quiet1")
    assert (await h.wait_final("quiet1"))["state"] == "success"
    await h.settle()
    assert httpx_lines(info_log) == []
    courier_lines = [r.getMessage() for r in info_log.records
                     if r.name.startswith("comfy_courier") and "quiet1" in r.getMessage()]
    assert len([line for line in courier_lines if line.startswith("[courier] success")]) == 1
