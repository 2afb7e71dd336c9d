"""A real ComfyUI (COMFYUI_DIR) on CPU with this checkout loaded, for the opt-in tests.

Each process gets a folder of its own: an extra-model-paths YAML naming `custom_nodes/`
with a symlink to this repo, and its own output, user and temp folders and ComfyUI
database (`--database-url`: ComfyUI 0.33 locks its database file, so two processes of one
install cannot share the default one). Its Python is COMFYUI_PYTHON, else
COMFYUI_DIR/.venv/bin/python, else this interpreter.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import API_KEY, CALLBACK_KEY, WORKFLOWS
from pgcluster import free_port

__all__ = ["COMFYUI_DIR", "REPO", "RealComfy", "comfy_python", "final_state", "free_port",
           "load", "require_tiny_checkpoint", "requires_comfyui", "start_comfy", "stop",
           "wait_up"]

REPO = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
TINY_CHECKPOINT = "tiny_sd15_random.safetensors"


def requires_comfyui(what: str = "run against a real ComfyUI") -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").exists(),
        reason=f"set COMFYUI_DIR to a ComfyUI checkout (with main.py) to {what}",
    )


def comfy_python(comfy_dir: Path) -> str:
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        return explicit
    venv = comfy_dir / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


@dataclass
class RealComfy:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    output: Path

    async def post(self, client: httpx.AsyncClient, workflow: dict, cid: str) -> httpx.Response:
        return await client.post(f"{self.url}/execute-workflow", headers={"X-API-Key": API_KEY},
                                 json={"workflow_json": workflow, "content_request_id": cid})

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def require_tiny_checkpoint() -> None:
    checkpoint = Path(COMFYUI_DIR or "") / "models" / "checkpoints" / TINY_CHECKPOINT
    if not checkpoint.exists():
        pytest.skip(f"tiny checkpoint missing: run shared/tools/make_tiny_sd15.py ({checkpoint})")


def load(name: str) -> dict[str, Any]:
    return dict(json.loads((WORKFLOWS / name).read_text()))


def start_comfy(base: Path, receiver_url: str, port: int, extra_env: dict[str, str]) -> RealComfy:
    """Start ComfyUI on `port` with its folders under `base` (kept: a restart on the same
    `base` finds its journal, output and log again); `extra_env` overrides the courier's
    settings (local storage and a SQLite journal in `base` unless it says otherwise)."""
    comfy_dir = Path(COMFYUI_DIR or "")
    nodes = base / "nodes" / "custom_nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    link = nodes / "comfy_courier"
    if not link.is_symlink():
        link.symlink_to(REPO, target_is_directory=True)
    config = base / "extra_model_paths.yaml"
    config.write_text(
        f"courier:\n    base_path: {base / 'nodes'}\n    custom_nodes: custom_nodes\n"
    )
    output, user, temp = base / "output", base / "user", base / "temp"
    user.mkdir(exist_ok=True)
    env = dict(os.environ)
    for name in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "COURIER_PUBLIC_BASE_URL"):
        env.pop(name, None)  # a shell's production settings never reach a test
    env.update({
        "COURIER_API_KEY": API_KEY,
        "COURIER_CALLBACK_URL": receiver_url,
        "COURIER_CALLBACK_API_KEY": CALLBACK_KEY,
        "COURIER_DB": str(base / "courier.sqlite3"),
        "COURIER_STORAGE": "local",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **extra_env,
    })
    log = base / "comfyui.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [comfy_python(comfy_dir), "main.py", "--cpu", "--listen", "127.0.0.1",
             "--port", str(port), "--disable-auto-launch",
             "--extra-model-paths-config", str(config), "--output-directory", str(output),
             "--user-directory", str(user), "--temp-directory", str(temp),
             "--database-url", f"sqlite:///{base / 'comfyui.db'}"],
            cwd=comfy_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    return RealComfy(f"http://127.0.0.1:{port}", process, log, output)


async def wait_up(comfy: RealComfy, timeout: float = 180.0) -> dict[str, Any]:
    """Wait until the courier in `comfy` answers its health route ready; that answer."""
    deadline = time.monotonic() + timeout
    serving = False
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if comfy.process.poll() is not None:
                raise AssertionError(f"ComfyUI exited:\n{comfy.log_text()[-3000:]}")
            try:
                resp = await client.get(f"{comfy.url}/courier/health")
                if resp.status_code == 200 and resp.json().get("ready", True):
                    return dict(resp.json())
                # 404: ComfyUI serves; newer ones (0.33) serve before custom nodes load
                serving = serving or resp.status_code == 404
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    what = "comfy-courier did not load" if serving else "ComfyUI did not come up"
    raise AssertionError(f"{what}:\n{comfy.log_text()[-3000:]}")


def stop(comfy: RealComfy, sig: int = signal.SIGTERM) -> None:
    if comfy.process.poll() is None:
        comfy.process.send_signal(sig)
        try:
            comfy.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            comfy.process.kill()
            comfy.process.wait()


async def final_state(client: httpx.AsyncClient, comfy: RealComfy, cid: str,
                      timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = await client.get(f"{comfy.url}/execute-workflow/{cid}",
                                headers={"X-API-Key": API_KEY})
        body = resp.json()
        if body["state"] in ("success", "error"):
            return dict(body)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{cid} not final: {body}")
