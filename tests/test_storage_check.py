"""The start-up check of the Supabase bucket: a missing bucket, a refused key or a visibility
that does not match COURIER_URL_MODE is a config problem, in the log and in health."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import httpx
import pytest

from comfy_courier import wiring
from comfy_courier.executor.storage.supabase_storage import SupabaseStorage

from conftest import SERVICE_KEY, model_free


async def check(url: str, mode: str = "public", key: str = SERVICE_KEY,
                bucket: str = "comfy-outputs") -> list[str]:
    storage = SupabaseStorage(url, key, bucket, mode)  # type: ignore[arg-type]
    try:
        return await storage.check()
    finally:
        await storage.aclose()


async def test_a_bucket_that_matches_the_url_mode_has_no_problem(storage_server):
    assert await check(storage_server.url, "public") == []
    storage_server.state.add_bucket("private-out")
    assert await check(storage_server.url, "signed", bucket="private-out") == []
    storage_server.state.add_bucket("images-only", public=True, allowed_mime_types=["image/*"])
    assert await check(storage_server.url, bucket="images-only") == []


@pytest.mark.parametrize("arrange, mode, expected", [
    (lambda s: s.buckets.clear(), "public", "Supabase Storage has no bucket 'comfy-outputs'"),
    (lambda s: setattr(s.buckets["comfy-outputs"], "public", False), "public",
     "is private but COURIER_URL_MODE=public"),
    (lambda s: None, "signed", "is public but COURIER_URL_MODE=signed"),
    (lambda s: setattr(s.buckets["comfy-outputs"], "allowed_mime_types", ["image/png"]),
     "public", "uploads of image/jpeg, image/webp will fail"),
])
async def test_each_mismatch_is_one_problem_that_says_how_to_fix_it(storage_server, arrange,
                                                                    mode, expected):
    arrange(storage_server.state)
    [problem] = await check(storage_server.url, mode)
    assert expected in problem
    if "MIME" not in problem:
        assert "cli.py bucket create" in problem


async def test_a_refused_key_or_an_unreachable_server_is_a_problem(storage_server,
                                                                  unused_tcp_port):
    [refused] = await check(storage_server.url, key="anon-key")
    assert "refused SUPABASE_SERVICE_ROLE_KEY (403" in refused
    [down] = await check(f"http://127.0.0.1:{unused_tcp_port}")
    assert "cannot reach Supabase Storage" in down and "ConnectError" in down


async def test_a_private_bucket_in_public_mode_is_logged_and_counted_in_health(
        make_harness, storage_server, caplog):
    """The issue's case: jobs end in success, their public URL answers 400. Not silently."""
    storage_server.state.buckets["comfy-outputs"].public = False
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    before = (await (await h.client.get("/courier/health")).json())["config_problems"]
    caplog.set_level(logging.WARNING)
    [problem] = await wiring.check_storage(h.courier)
    assert f"[courier] config: {problem}" in caplog.text
    health = await (await h.client.get("/courier/health")).json()
    assert health["config_problems"] == before + 1
    assert "comfy-outputs" not in str(health)  # health stays free of names
    # jobs still run; their URL is the one the log warned about
    await h.post(model_free(), "priv1")
    final = await h.wait_final("priv1")
    assert final["state"] == "success"
    async with httpx.AsyncClient() as client:
        assert (await client.get(final["image_url"])).status_code == 400


async def test_an_upload_to_a_missing_bucket_names_the_fix(make_harness, storage_server):
    storage_server.state.buckets.clear()
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    await h.post(model_free(), "nobucket1")
    final = await h.wait_final("nobucket1")
    assert final["error_type"] == "upload"
    assert "COURIER_BUCKET='comfy-outputs'" in final["error_message"]
    assert "bucket create" in final["error_message"]


async def test_local_storage_has_nothing_to_check(make_harness):
    h = await make_harness()
    assert await wiring.check_storage(h.courier) == []


async def test_start_up_runs_the_check_beside_the_courier(storage_server, caplog):
    """wiring._start, as ComfyUI's on_startup calls it: the courier starts, the check runs."""
    storage_server.state.buckets.clear()
    started = asyncio.Event()

    async def start() -> None:
        started.set()

    storage = SupabaseStorage(storage_server.url, SERVICE_KEY, "comfy-outputs")
    courier = SimpleNamespace(start=start, storage=storage, config_problems=["earlier"])
    caplog.set_level(logging.WARNING)
    try:
        wiring._start(courier)  # type: ignore[arg-type]
        await started.wait()

        async def checked() -> None:
            while len(courier.config_problems) < 2:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(checked(), 10)
    finally:
        await storage.aclose()
    assert "no bucket 'comfy-outputs'" in courier.config_problems[1]
    assert "[courier] config: Supabase Storage has no bucket" in caplog.text


async def test_a_check_that_hangs_or_breaks_is_reported_not_raised(monkeypatch):
    async def hangs() -> list[str]:
        await asyncio.Event().wait()
        return []

    async def breaks() -> list[str]:
        raise RuntimeError("boom")

    monkeypatch.setattr(wiring, "STORAGE_CHECK_TIMEOUT", 0.01)
    for fn, expected in ((hangs, "no answer within"), (breaks, "RuntimeError('boom')")):
        courier = SimpleNamespace(storage=SimpleNamespace(check=fn), config_problems=[])
        [problem] = await wiring.check_storage(courier)  # type: ignore[arg-type]
        assert expected in problem and courier.config_problems == [problem]
