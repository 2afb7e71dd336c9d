"""The README's commands, run as written after a ComfyUI-Manager or git install.

The repository is copied to `<tmp>/ComfyUI/custom_nodes/comfy-courier` and every
`python custom_nodes/comfy-courier/cli.py …` and `curl …` command of the README's bash
blocks runs from `<tmp>/ComfyUI` through bash, with a `python` that has the package's
requirements (as ComfyUI's Python has after the Manager installed them) but no installed
`comfy_courier`: a poisoned one comes first on PYTHONPATH, so a command that relied on an
install fails. Only the address changes: the README's `http://127.0.0.1:8188` (ComfyUI's
default) becomes a courier on a stand-in ComfyUI, and `--port 9000` a free port.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from comfy_courier.executor.signing import signature_headers

from conftest import API_KEY, SERVICE_KEY

ROOT = Path(__file__).resolve().parents[1]
CLI = "python custom_nodes/comfy-courier/cli.py"
DEFAULT_URL = "http://127.0.0.1:8188"
COPY_IGNORE = shutil.ignore_patterns(".git", "tests", "benchmarks", "clients", "node_modules",
                                     "__pycache__", ".*_cache", "*.egg-info", ".hypothesis")


def readme_commands() -> list[str]:
    """Every cli.py and curl command in the README's bash blocks, continuation lines joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+", " ", command).strip()
            if command.startswith((CLI + " ", "curl ")):
                commands.append(command)
    return commands


def kind(command: str) -> str:
    if command.startswith("curl "):
        return "curl"
    words = command[len(CLI):].split()
    return " ".join(words[:2]) if words[0] == "bucket" else words[0]


@pytest.fixture
def comfyui(tmp_path: Path) -> Path:
    """A ComfyUI folder with the package where the Manager or `git clone` puts it."""
    home = tmp_path / "ComfyUI"
    shutil.copytree(ROOT, home / "custom_nodes" / "comfy-courier", ignore=COPY_IGNORE)
    return home


def environment(tmp_path: Path, **more: str) -> dict[str, str]:
    poison = tmp_path / "poison" / "comfy_courier"
    poison.mkdir(parents=True, exist_ok=True)
    (poison / "__init__.py").write_text(
        "raise ImportError('a README command used an installed comfy_courier')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COURIER_", "SUPABASE_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `python`
        PYTHONPATH=str(poison.parent),
        COURIER_API_KEY=API_KEY,
        **more,
    )
    return env


def as_run_here(command: str, url: str, port: int) -> str:
    """The command against the test's courier: its address, and a free port for listen."""
    command = command.replace(DEFAULT_URL, url).replace("--port 9000", f"--port {port}")
    if kind(command) in ("submit", "redeliver") and "--url" not in command:
        command += f" --url {url}"
    return command


async def run(command: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def test_the_readme_has_the_commands_this_test_runs():
    kinds = {kind(c) for c in readme_commands()}
    assert kinds == {"curl", "--help", "webhook-secret", "bucket create", "bucket check",
                     "submit", "listen", "redeliver"}, kinds


async def test_every_readme_command_works_as_written(comfyui, tmp_path, make_harness,
                                                     storage_server, unused_tcp_port):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (the README's first call uses it)")
    h = await make_harness()
    url = str(h.client.make_url("")).rstrip("/")
    storage_server.state.buckets.clear()
    env = environment(tmp_path, SUPABASE_URL=storage_server.url,
                      SUPABASE_SERVICE_ROLE_KEY=SERVICE_KEY)
    h.receiver.script = [(410, {}, 0.0)]  # the first call's callback dies: redeliver has work
    commands = [as_run_here(c, url, unused_tcp_port) for c in readme_commands()]
    ran: dict[str, list[tuple[int, str, str]]] = {}

    async def run_kind(name: str) -> list[tuple[int, str, str]]:
        for command in (c for c in commands if kind(c) == name):
            ran.setdefault(name, []).append(await run(command, comfyui, env))
        return ran[name]

    for code, out, err in await run_kind("--help"):
        assert code == 0 and "redeliver" in out and "usage: python custom_nodes" in out, err
    for code, out, err in await run_kind("webhook-secret"):
        assert code == 0 and re.fullmatch(r"whsec_[A-Za-z0-9+/]{43}=\n", out), (out, err)

    for code, out, err in await run_kind("bucket create"):
        assert code == 0 and "public bucket 'comfy-outputs'" in out, (out, err)
    assert storage_server.state.buckets["comfy-outputs"].public is True
    for code, out, err in await run_kind("bucket check"):
        assert code == 0 and out.startswith("ok: bucket 'comfy-outputs'"), (out, err)

    [(code, out, err)] = await run_kind("curl")
    assert code == 0, err
    accepted = json.loads(out)
    assert accepted["state"] == "queued" and accepted["progress"] == 0.0
    assert (await h.wait_final("first-call-1"))["state"] == "success"
    await h.receiver.wait_for(1)
    await h.settle()
    assert (await h.status("first-call-1"))["callback"]["state"] == "dead"

    for code, out, err in await run_kind("submit"):
        assert code == 0 and "final: success" in err, err
        assert json.loads(out[out.rindex("\n{") + 1:])["state"] == "success"

    [(code, out, err), (code2, out2, err2)] = await run_kind("redeliver")  # --id, then --since
    assert code == 0 and json.loads(out)["redelivered"] == 1, err
    assert code2 == 0 and json.loads(out2)["redelivered"] == 0, err2
    await h.settle()
    assert (await h.status("first-call-1"))["callback"]["state"] == "delivered"

    [listen] = [c for c in commands if kind(c) == "listen"]
    await check_listen(listen, comfyui, env, unused_tcp_port)


async def check_listen(command: str, cwd: Path, env: dict[str, str], port: int) -> None:
    key, secret = "another-long-random-key", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    env = {**env, "COURIER_CALLBACK_API_KEY": key, "COURIER_WEBHOOK_SECRET": secret}
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", f"exec {command}", cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert process.stderr is not None and process.stdout is not None
        line = await asyncio.wait_for(process.stderr.readline(), 60)
        assert line.startswith(b"listening on http://127.0.0.1:"), line
        body = json.dumps({"content_request_id": "cb-1", "status": "success",
                           "image_url": None, "error_message": None}).encode()
        headers = {"X-API-Key": key, "Content-Type": "application/json",
                   **signature_headers("msg_readme", body, [secret])}
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"http://127.0.0.1:{port}/callback", content=body,
                                       headers=headers)
        assert answer.status_code == 200, answer.text
        printed = b""
        while b"signature:  ok" not in printed:
            printed += await asyncio.wait_for(process.stdout.readline(), 30)
        assert b"key:        ok" in printed and b"webhook-id: msg_readme" in printed
    finally:
        process.terminate()
        await process.wait()


def test_the_installed_command_is_the_same_helper(tmp_path):
    """`comfy-courier`, the console script of a pip install, as the README says."""
    script = shutil.which("comfy-courier", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("no comfy-courier script beside this Python (not installed with pip)")
    result = subprocess.run([script, "webhook-secret"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("whsec_"), result.stderr
    helped = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: comfy-courier")
