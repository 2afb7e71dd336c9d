"""The operator's helpers (admin.py) against real loopback peers: a Supabase-Storage server
speaking the bucket API, and the courier's redelivery route (stand-in ComfyUI)."""

from __future__ import annotations

import base64
import json
import sys
from io import StringIO
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from comfy_courier import admin, cli
from comfy_courier.executor.settings import Settings

from conftest import API_KEY, SERVICE_KEY, model_free


class Run:
    def __init__(self, code: int, out: StringIO, err: StringIO) -> None:
        self.code, self.out, self.err = code, out.getvalue(), err.getvalue()


async def run(argv: list[str], environ: dict[str, str] | None = None) -> Run:
    args = cli.build_parser().parse_args(argv)
    out, err = StringIO(), StringIO()
    code = await args.run(args, out, err, environ or {})
    return Run(code, out, err)


# -- webhook-secret --------------------------------------------------------------------


async def test_webhook_secret_is_whsec_and_32_random_bytes_the_courier_accepts():
    first, second = (await run(["webhook-secret"])).out, (await run(["webhook-secret"])).out
    assert first != second
    secret = first.strip()
    assert secret.startswith("whsec_") and first.endswith("\n") and "\n" not in secret
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    settings = Settings.from_env({"COURIER_API_KEY": API_KEY, "COURIER_WEBHOOK_SECRET": secret})
    assert settings.webhook_secrets == (secret,)
    assert not [p for p in settings.problems if "WEBHOOK" in p]
    Webhook(secret)  # what receivers verify with


# -- bucket ----------------------------------------------------------------------------


def supabase_env(storage_server: Any, **more: str) -> dict[str, str]:
    return {"SUPABASE_URL": storage_server.url, "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY, **more}


async def test_bucket_create_makes_a_public_bucket_for_public_urls(storage_server):
    storage_server.state.buckets.clear()
    env = supabase_env(storage_server)
    checked = await run(["bucket", "check"], env)
    assert checked.code == admin.EXIT_PROBLEMS and "no bucket 'comfy-outputs'" in checked.out
    created = await run(["bucket", "create"], env)
    assert created.code == 0, created.out + created.err
    assert "created the public bucket 'comfy-outputs'" in created.out and "ok:" in created.out
    assert storage_server.state.buckets["comfy-outputs"].public is True
    again = await run(["bucket", "create"], env)
    assert again.code == 0 and "exists and is public already" in again.out
    assert (await run(["bucket", "check"], env)).code == 0


async def test_bucket_create_fixes_the_visibility_the_url_mode_needs(storage_server):
    storage_server.state.buckets["comfy-outputs"].public = False  # the client's default
    created = await run(["bucket", "create"], supabase_env(storage_server))
    assert created.code == 0 and "made the bucket 'comfy-outputs' public" in created.out
    assert storage_server.state.buckets["comfy-outputs"].public is True
    signed = supabase_env(storage_server, COURIER_URL_MODE="signed", COURIER_BUCKET="private-out")
    created = await run(["bucket", "create"], signed)
    assert created.code == 0 and "created the private bucket 'private-out'" in created.out
    assert storage_server.state.buckets["private-out"].public is False


async def test_bucket_commands_fail_clearly(storage_server):
    wrong_key = {"SUPABASE_URL": storage_server.url, "SUPABASE_SERVICE_ROLE_KEY": "not-the-key"}
    created = await run(["bucket", "create"], wrong_key)
    assert created.code == 2 and "refused SUPABASE_SERVICE_ROLE_KEY" in created.err
    checked = await run(["bucket", "check"], wrong_key)
    assert checked.code == admin.EXIT_PROBLEMS
    assert "refused SUPABASE_SERVICE_ROLE_KEY" in checked.out
    assert storage_server.state.buckets.keys() == {"comfy-outputs"}
    with pytest.raises(cli.UsageError, match="SUPABASE_URL"):
        await run(["bucket", "check"], {})


# -- redeliver -------------------------------------------------------------------------


def test_since_accepts_durations_unix_seconds_and_iso_text():
    assert admin.since_value("90m", 10_000.0) == 10_000.0 - 5400
    assert admin.since_value("2d", 200_000.0) == 200_000.0 - 172_800
    assert admin.since_value("1764064800", 0) == 1764064800.0
    assert admin.since_value("2025-11-25T10:00:00Z", 0) == "2025-11-25T10:00:00Z"


async def test_redeliver_sends_a_dead_callback_again(make_harness):
    h = await make_harness()
    h.receiver.script = [(410, {}, 0.0)]
    await h.post(model_free(), "cli-rd1")
    await h.wait_final("cli-rd1")
    await h.settle()
    url = str(h.client.make_url("")).rstrip("/")
    done = await run(["redeliver", "--id", "cli-rd1", "--url", url], {"COURIER_API_KEY": API_KEY})
    assert done.code == 0, done.err
    assert json.loads(done.out)["redelivered"] == 1 and "1 dead callback(s) queued" in done.err
    await h.receiver.wait_for(2)
    await h.settle()
    assert (await h.status("cli-rd1"))["callback"]["state"] == "delivered"
    ids = [r.headers["webhook-id"] for r in h.receiver.requests]
    assert len(ids) == 2 and ids[0] == ids[1]
    since = await run(["redeliver", "--since", "1h", "--url", url, "--key", API_KEY])
    assert since.code == 0 and json.loads(since.out) == {"redelivered": 0, "events": []}
    unknown = await run(["redeliver", "--id", "nobody", "--url", url, "--key", API_KEY])
    assert unknown.code == 2 and "HTTP 404" in unknown.err
    bad_time = await run(["redeliver", "--since", "soon", "--url", url, "--key", API_KEY])
    assert bad_time.code == 2 and "ISO 8601" in bad_time.out


async def test_redeliver_needs_a_key_and_a_reachable_courier(unused_tcp_port):
    with pytest.raises(cli.UsageError, match="API key"):
        await run(["redeliver", "--id", "x"])
    down = await run(["redeliver", "--id", "x", "--url", f"http://127.0.0.1:{unused_tcp_port}",
                      "--key", API_KEY])
    assert down.code == 2 and "cannot reach" in down.err


# -- the entry point -------------------------------------------------------------------


def test_listen_without_aiohttp_says_what_to_install(monkeypatch, capsys, unused_tcp_port):
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # as outside ComfyUI, without the extra
    monkeypatch.delitem(sys.modules, "comfy_courier.listener", raising=False)
    assert cli.main(["listen", "--port", str(unused_tcp_port)]) == cli.EXIT_REJECTED
    err = capsys.readouterr().err
    assert "listen needs aiohttp" in err and "comfy-courier[listen]" in err


def test_usage_lines_name_the_command_as_the_user_ran_it():
    assert cli.program_name("custom_nodes/comfy-courier/cli.py") == (
        "python custom_nodes/comfy-courier/cli.py")
    assert cli.program_name("/venv/lib/comfy_courier/__main__.py") == "python -m comfy_courier"
    assert cli.program_name("/venv/bin/comfy-courier") == "comfy-courier"
