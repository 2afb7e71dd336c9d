"""The command-line helpers against the real courier (stand-in ComfyUI) and real loopback HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest

from comfy_courier import cli
from comfy_courier import listener as receiver
from comfy_courier.executor.intake import ID_PATTERN
from comfy_courier.executor.signing import signature_headers

from conftest import API_KEY, CALLBACK_KEY, WEBHOOK_SECRET, model_free

OTHER_SECRET = "whsec_QmFzZTY0T3RoZXJTZWNyZXRGb3JSb3RhdGlvbg=="


class Run:
    """One CLI invocation: exit code and what it printed."""

    def __init__(self, code: int, out: StringIO, err: StringIO) -> None:
        self.code, self.out, self.err = code, out.getvalue(), err.getvalue()

    def last_json(self) -> Any:
        """The last JSON document on stdout (submit prints the answer, then the final state)."""
        text = self.out.rstrip()
        start = text.rfind("\n{")
        return json.loads(text[start + 1 :] if start >= 0 else text)


async def submit(argv: list[str], environ: dict[str, str] | None = None) -> Run:
    args = cli.build_parser().parse_args(["submit", *argv])
    out, err = StringIO(), StringIO()
    code = await cli.run_submit(args, out, err, environ or {})
    return Run(code, out, err)


def write(tmp_path: Path, data: Any, name: str = "workflow.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def base_url(h: Any) -> str:
    return str(h.client.make_url("")).rstrip("/")


# -- submit ----------------------------------------------------------------------------


async def test_submit_and_wait_until_success(make_harness, tmp_path):
    h = await make_harness()
    run = await submit(
        [
            write(tmp_path, model_free()),
            "--url",
            base_url(h),
            "--key",
            API_KEY,
            "--id",
            "cli-ok-1",
            "--wait",
            "--interval",
            "0.01",
            "--timeout",
            "10",
        ]
    )
    assert run.code == cli.EXIT_OK, run.err
    assert "HTTP 202" in run.err and "final: success" in run.err
    final = run.last_json()
    assert final["content_request_id"] == "cli-ok-1" and final["state"] == "success"
    assert final["image_url"].startswith("http://courier.test:8188/view?")
    await h.receiver.wait_for(1)
    assert h.receiver.bodies("cli-ok-1")[0]["status"] == "success"


async def test_submit_without_wait_prints_the_202_body(make_harness, tmp_path):
    h = await make_harness(start_worker=False)
    run = await submit(
        [
            write(tmp_path, model_free()),
            "--url",
            base_url(h),
            "--key",
            API_KEY,
            "--id",
            "cli-nowait",
        ]
    )
    assert run.code == cli.EXIT_OK
    assert json.loads(run.out)["state"] == "queued" and "HTTP 202 Accepted" in run.err


async def test_generated_id_and_key_from_environment(make_harness, tmp_path):
    h = await make_harness(start_worker=False)
    run = await submit(
        [write(tmp_path, model_free()), "--url", base_url(h)],
        environ={"COURIER_API_KEY": f"{API_KEY},an-older-key"},
    )
    assert run.code == cli.EXIT_OK, run.out
    cid = json.loads(run.out)["content_request_id"]
    assert cid.startswith("cli-") and ID_PATTERN.fullmatch(cid)
    assert (await h.status(cid))["state"] == "queued"


async def test_saved_request_body_is_replayed_with_its_id(make_harness, tmp_path):
    h = await make_harness(start_worker=False)
    path = write(tmp_path, {"workflow_json": model_free(), "content_request_id": "from-file"})
    run = await submit([path, "--url", base_url(h) + "/api", "--key", API_KEY])
    assert run.code == cli.EXIT_OK, run.out
    assert json.loads(run.out)["content_request_id"] == "from-file"


async def test_job_error_exits_1_with_the_reason(make_harness, tmp_path):
    h = await make_harness()
    workflow = model_free()
    workflow["3"] = {"class_type": "FailingNode", "inputs": {"message": "out of paint"}}
    workflow["2"]["inputs"]["images"] = ["3", 0]  # only what an output needs runs
    run = await submit(
        [
            write(tmp_path, workflow),
            "--url",
            base_url(h),
            "--key",
            API_KEY,
            "--id",
            "cli-err",
            "--wait",
            "--interval",
            "0.01",
            "--timeout",
            "10",
        ]
    )
    assert run.code == cli.EXIT_JOB_ERROR
    final = run.last_json()
    assert final["state"] == "error" and "out of paint" in final["error_message"]
    assert "final: error [execution]" in run.err


async def test_validation_rejection_exits_2_with_node_errors(make_harness, tmp_path):
    h = await make_harness()
    workflow = {
        "1": {"class_type": "NoSuchNode", "inputs": {}},
        "2": {"class_type": "SaveAndCallback", "inputs": {"images": ["1", 0]}},
    }
    run = await submit(
        [
            write(tmp_path, workflow),
            "--url",
            base_url(h),
            "--key",
            API_KEY,
            "--id",
            "cli-invalid",
            "--wait",
            "--interval",
            "0.01",
        ]
    )
    assert run.code == cli.EXIT_REJECTED
    assert "HTTP 400" in run.err
    body = json.loads(run.out)
    assert "error" in body and "node_errors" in body
    assert h.receiver.requests == []  # rejections never call back


async def test_ui_format_is_named_before_sending_and_rejected(make_harness, tmp_path):
    h = await make_harness()
    ui = {"last_node_id": 2, "nodes": [{"id": 1, "type": "EmptyImage"}], "links": []}
    run = await submit(
        [write(tmp_path, ui), "--url", base_url(h), "--key", API_KEY, "--id", "cli-ui"]
    )
    assert run.code == cli.EXIT_REJECTED
    warning, post = run.err.index("UI-format workflow"), run.err.index("POST ")
    assert warning < post and "Export (API)" in run.err
    assert json.loads(run.out)["error"]["hint"] == "ui_format"


async def test_wrong_key_exits_2(make_harness, tmp_path):
    h = await make_harness()
    run = await submit(
        [write(tmp_path, model_free()), "--url", base_url(h), "--key", "nope", "--id", "cli-key"]
    )
    assert run.code == cli.EXIT_REJECTED and "HTTP 401" in run.err


async def test_wait_gives_up_at_the_timeout_with_exit_3(make_harness, tmp_path):
    h = await make_harness(start_worker=False)  # nothing runs: the job stays queued
    run = await submit(
        [
            write(tmp_path, model_free()),
            "--url",
            base_url(h),
            "--key",
            API_KEY,
            "--id",
            "cli-slow",
            "--wait",
            "--interval",
            "0.01",
            "--timeout",
            "0.1",
        ]
    )
    assert run.code == cli.EXIT_WAIT_TIMEOUT
    assert "queued (queue position 0)" in run.err and "gave up after 0.1 s" in run.err


async def test_unreachable_courier_exits_2(tmp_path, unused_tcp_port):
    run = await submit(
        [
            write(tmp_path, model_free()),
            "--url",
            f"http://127.0.0.1:{unused_tcp_port}",
            "--key",
            API_KEY,
        ]
    )
    assert run.code == cli.EXIT_REJECTED and "cannot reach" in run.err


def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["submit", str(tmp_path / "missing.json"), "--key", "k"]) == 2
    assert "cannot read" in capsys.readouterr().err
    path = write(tmp_path, model_free())
    assert cli.main(["submit", path, "--key", "k", "--id", "has/slash"]) == 2
    assert "--id" in capsys.readouterr().err


def test_workflow_format():
    assert cli.workflow_format(model_free()) == "api"
    assert cli.workflow_format({"nodes": [], "links": []}) == "ui"
    assert cli.workflow_format([1, 2]) == "unknown"
    assert cli.workflow_format({"1": "x"}) == "unknown"


# -- listen ----------------------------------------------------------------------------


@pytest.fixture
async def listen():
    started: list[receiver.Listener] = []

    async def start(**kwargs: Any) -> tuple[receiver.Listener, StringIO]:
        out = StringIO()
        listener = await receiver.serve_listener(out=out, **kwargs)
        started.append(listener)
        return listener, out

    yield start
    for listener in started:
        await listener.close()


def callback_body(cid: str = "cb-1") -> bytes:
    return json.dumps(
        {
            "content_request_id": cid,
            "status": "success",
            "image_url": "https://example.test/a.png",
            "error_message": None,
        },
        separators=(",", ":"),
    ).encode()


async def post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(
            url + "callback", content=body, headers={"Content-Type": "application/json", **headers}
        )


async def test_signed_callback_is_verified(listen):
    listener, out = await listen(keys=[CALLBACK_KEY], secret_list=[WEBHOOK_SECRET])
    body = callback_body()
    headers = signature_headers("msg_1", body, [WEBHOOK_SECRET])
    response = await post(listener.url, body, {"X-API-Key": CALLBACK_KEY, **headers})
    assert response.status_code == 200
    text = out.getvalue()
    assert "POST /callback" in text and "webhook-id: msg_1" in text
    assert "key:        ok" in text and "signature:  ok" in text
    assert '"content_request_id": "cb-1"' in text  # pretty-printed body
    [delivery] = listener.received
    assert delivery.verdict.ok and delivery.body["status"] == "success"


async def test_tampered_callback_is_bad_and_refused(listen):
    listener, out = await listen(keys=[CALLBACK_KEY], secret_list=[WEBHOOK_SECRET])
    headers = signature_headers("msg_2", callback_body("cb-2"), [WEBHOOK_SECRET])
    response = await post(
        listener.url, callback_body("cb-EVIL"), {"X-API-Key": CALLBACK_KEY, **headers}
    )
    assert response.status_code == 401
    assert response.json()["signature"] == "bad"
    assert "signature:  bad (No matching signature found)" in out.getvalue()


async def test_accept_bad_answers_200_but_still_reports(listen):
    listener, out = await listen(keys=[CALLBACK_KEY], secret_list=[WEBHOOK_SECRET], accept_bad=True)
    response = await post(listener.url, callback_body(), {"X-API-Key": "wrong"})
    assert response.status_code == 200
    assert "key:        bad" in out.getvalue() and "signature:  unsigned" in out.getvalue()


async def test_stale_signature_and_missing_key_are_refused(listen):
    listener, out = await listen(keys=[CALLBACK_KEY], secret_list=[WEBHOOK_SECRET])
    body = callback_body()
    old = datetime.now(timezone.utc) - timedelta(minutes=10)
    response = await post(
        listener.url, body, signature_headers("msg_3", body, [WEBHOOK_SECRET], timestamp=old)
    )
    assert response.status_code == 401
    assert response.json() == {"ok": False, "key": "missing", "signature": "bad"}
    assert "timestamp too old" in out.getvalue()


async def test_rotated_secrets_and_repeats(listen):
    listener, out = await listen(secret_list=[OTHER_SECRET, WEBHOOK_SECRET])
    body = callback_body()
    for _ in range(2):  # at-least-once delivery: the same event again, signed afresh
        headers = signature_headers("msg_4", body, [WEBHOOK_SECRET])
        assert (await post(listener.url, body, headers)).status_code == 200
    assert [d.verdict.key for d in listener.received] == ["unchecked", "unchecked"]
    assert [d.repeat for d in listener.received] == [False, True]
    assert "(repeat: de-duplicate on this id)" in out.getvalue()


async def test_bad_secret_is_refused_before_listening():
    with pytest.raises(ValueError, match="whsec_"):
        await receiver.serve_listener(secret_list=["whsec_not base64!"])


def test_listen_usage_errors_exit_2(capsys, unused_tcp_port):
    assert cli.main(["listen", "--port", str(unused_tcp_port), "--secret", "whsec_a"]) == 2
    assert "invalid webhook secret" in capsys.readouterr().err


async def test_listener_receives_the_couriers_own_signed_callback(make_harness, listen, tmp_path):
    listener, out = await listen(keys=[CALLBACK_KEY], secret_list=[WEBHOOK_SECRET])
    h = await make_harness(
        env={
            "COURIER_CALLBACK_URL": listener.url + "hook",
            "COURIER_WEBHOOK_SECRET": WEBHOOK_SECRET,
        }
    )
    run = await submit(
        [
            write(tmp_path, model_free()),
            "--url",
            base_url(h),
            "--key",
            API_KEY,
            "--id",
            "cli-e2e",
            "--wait",
            "--interval",
            "0.01",
            "--timeout",
            "10",
        ]
    )
    assert run.code == cli.EXIT_OK, run.err
    await h.settle()
    [delivery] = listener.received
    assert delivery.path == "/hook" and delivery.status == 200
    assert delivery.verdict == receiver.Verdict("ok", "ok")
    assert delivery.body["content_request_id"] == "cli-e2e"
    assert delivery.webhook_id and delivery.webhook_id in out.getvalue()


# -- the module entry point ------------------------------------------------------------


def test_python_dash_m_runs_without_comfyui(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "comfy_courier", "submit", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "--wait" in result.stdout
