"""The server a benchmark measures: ComfyUI (real or stand-in) with this checkout, in a process.

- a real ComfyUI (`COMFYUI_DIR` set, or `--comfy-dir`): started like tests/test_real_comfyui.py
  does (own temp output/user folders, COURIER_DB in temp, --extra-model-paths-config with a
  symlink to this checkout, plus the CourierBenchSleep node of bench_node.py);
- otherwise the ComfyUI stand-in of tests/standin/comfy.py with the courier wired in exactly
  as `wiring.setup()` wires it, plus the ComfyUI routes the comparisons need (/prompt,
  /history/{id}, /ws): see standin_server.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_node import loader_source
from checkout import API_KEY, BENCH, REPO
from client import http_json
from workflows import blocker_workflow

# -- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the server --------------------------------------------------------------------------


@dataclass
class Server:
    """A ComfyUI (real or stand-in) with this package loaded, in its own process."""

    kind: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    base: Path
    db: Path | str  # the SQLite journal, or a postgresql:// URL
    output: Path
    started_at: float = field(default_factory=time.monotonic)
    up_after: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> dict[str, int]:
        """VmRSS and VmHWM of the server with its child processes (the journal process)."""
        total = rss_kib(self.pid)
        for pid in child_pids(self.pid):
            try:
                child = rss_kib(pid)
            except OSError:  # ended meanwhile
                continue
            for key, kib in child.items():
                total[key] = total.get(key, 0) + kib
        return total

    def stop(self) -> None:
        stop_process(self.process)

    def loop_cpu(self) -> float:
        """CPU seconds of the server's main thread, where ComfyUI's server loop runs
        (schedstat: nanoseconds, where stat counts 10 ms ticks)."""
        return int(Path(f"/proc/{self.pid}/task/{self.pid}/schedstat").read_text().split()[0]) / 1e9

    def wait_up(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited:\n{self.log.read_text()[-4000:]}")
            try:
                status, body = http_json(f"{self.url}/courier/health", timeout=2)
                if status == 200 and isinstance(body, dict) and body.get("ready"):
                    self.up_after = time.monotonic() - self.started_at
                    return
                if status == 404:  # ComfyUI serves, but comfy-courier did not load
                    lines = [
                        ln
                        for ln in self.log.read_text(errors="replace").splitlines()
                        if "courier" in ln.lower() or "Error" in ln
                    ]
                    self.stop()
                    raise RuntimeError(
                        f"{self.kind} runs without comfy-courier (import failed?):\n"
                        + "\n".join(lines[-15:])
                        + f"\nlog: {self.log}"
                    )
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.kind} did not come up:\n{self.log.read_text()[-4000:]}")

    def queue_remaining(self) -> int:
        status, body = http_json(f"{self.url}/prompt")
        return int(body["exec_info"]["queue_remaining"]) if status == 200 else -1

    def block_worker(self, seconds: float) -> str:
        """Queue a job that keeps the worker busy (and the CPU free) for `seconds`."""
        status, body = http_json(
            f"{self.url}/prompt",
            "POST",
            {"prompt": blocker_workflow(seconds, self.kind == "stand-in")},
        )
        if status != 200:
            raise RuntimeError(f"blocker refused: {status} {body}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until it runs (it is alone in the queue)
            if self.queue_remaining() == 1:
                time.sleep(0.2)
                return str(body["prompt_id"])
            time.sleep(0.05)
        return str(body["prompt_id"])

    def clear_queue(self) -> None:
        """ComfyUI's POST /queue {"clear": true}: drop every pending prompt."""
        http_json(f"{self.url}/queue", "POST", {"clear": True})

    def health(self) -> dict[str, Any]:
        return dict(http_json(f"{self.url}/courier/health")[1])

    def drain(self, timeout: float = 600.0, outbox: bool = True) -> float:
        """Wait until ComfyUI's queue is empty and the courier has nothing unfinished or
        undelivered; returns the seconds waited."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.queue_remaining() == 0:
                health = self.health()
                if health["queue"]["courier_unfinished"] == 0 and (
                    not outbox or health["outbox"]["pending"] == 0
                ):
                    return time.monotonic() - start
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind}: queue did not drain in {timeout:.0f} s")


# -- starting one ------------------------------------------------------------------------


def comfy_python(comfy_dir: Path) -> str:
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        return explicit
    venv = comfy_dir / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def comfy_version(comfy_dir: Path | None) -> str:
    if comfy_dir is None:
        return "stand-in (tests/standin/comfy.py, 0.3.64 shapes)"
    try:
        text = (comfy_dir / "comfyui_version.py").read_text()
        return "ComfyUI " + text.split("=")[-1].strip().strip("\"'")
    except OSError:
        return f"ComfyUI at {comfy_dir}"


def start_server(
    base: Path,
    comfy_dir: Path | None,
    env: dict[str, str] | None = None,
    input_dir: Path | None = None,
    port: int | None = None,
    standin_args: Sequence[str] = (),
) -> Server:
    base.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    output = base / "output"
    output.mkdir(exist_ok=True)
    db: Path | str = base / "courier.sqlite3"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("COURIER_", "SUPABASE_"))}
    environ.update(
        {
            "COURIER_API_KEY": API_KEY,
            "COURIER_DB": str(db),
            "COURIER_STORAGE": "local",
            "CUDA_VISIBLE_DEVICES": "",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "DO_NOT_TRACK": "1",
            "OMP_NUM_THREADS": os.environ.get("COMFYUI_THREADS", "1"),
            "MKL_NUM_THREADS": os.environ.get("COMFYUI_THREADS", "1"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    environ.update(env or {})
    if "COURIER_DB" in (env or {}):
        named = environ["COURIER_DB"]
        db = named if named.startswith(("postgresql://", "postgres://")) else Path(named)
    log = base / "server.log"
    if comfy_dir is None:
        cmd = [
            sys.executable,
            str(BENCH / "standin_server.py"),
            "--port",
            str(port),
            "--base",
            str(base / "standin"),
            *standin_args,
        ]
        cwd = str(REPO)
        kind = "stand-in"
    else:
        nodes = base / "nodes" / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        link = nodes / "comfy_courier"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        # the benchmark node (CourierBenchSleep)
        tools = nodes / "courier_bench_tools"
        tools.mkdir(exist_ok=True)
        (tools / "__init__.py").write_text(loader_source())
        config = base / "extra_model_paths.yaml"
        config.write_text(
            f"courier:\n    base_path: {base / 'nodes'}\n    custom_nodes: custom_nodes\n"
        )
        user = base / "user"
        user.mkdir(exist_ok=True)
        cmd = [
            comfy_python(comfy_dir),
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-auto-launch",
            "--extra-model-paths-config",
            str(config),
            "--output-directory",
            str(output),
            "--user-directory",
            str(user),
            "--database-url",
            f"sqlite:///{base / 'comfyui.db'}",
        ]
        if input_dir is not None:
            cmd += ["--input-directory", str(input_dir)]
        cwd = str(comfy_dir)
        kind = comfy_version(comfy_dir)
    process = subprocess.Popen(
        cmd, cwd=cwd, env=environ, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    return Server(kind, f"http://127.0.0.1:{port}", port, process, log, base, db, output)
