"""Shared plumbing for the benchmarks: servers, peers, a lean HTTP client, stats, output.

Every benchmark talks HTTP to one of two servers, started as a separate process:
- a real ComfyUI (`COMFYUI_DIR` set, or `--comfy-dir`): started like tests/test_real_comfyui.py
  does (own temp output/user folders, COURIER_DB in temp, --extra-model-paths-config with a
  symlink to this checkout);
- otherwise the ComfyUI stand-in of tests/standin/comfy.py with the courier wired in exactly
  as `wiring.setup()` wires it, plus the ComfyUI routes the comparisons need (/prompt,
  /history/{id}, /ws): see standin_server.py.
The peers (a Supabase-Storage-compatible server and a callback receiver) run in a third
process (peers.py), so neither the client nor the server pays for them.

Timestamps that cross processes use time.monotonic() (CLOCK_MONOTONIC, system-wide on Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
TESTS = REPO / "tests"
SHARED_WORKFLOWS = REPO.parent / "shared" / "workflows"

API_KEY = "bench-inbound-key-0123456789abcdef"
CALLBACK_KEY = "bench-callback-key-0123456789abcdef"
SERVICE_KEY = "bench-service-role-key-0123456789"
BUCKET = "comfy-outputs"

# /work/shared/workflows/model-free.json, embedded so a checkout without it still runs.
MODEL_FREE: dict[str, Any] = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 16753920},
        "_meta": {"title": "Empty Image (no model needed)"},
    },
    "2": {
        "class_type": "SaveAndCallback",
        "inputs": {"images": ["1", 0], "filename_prefix": "social"},
        "_meta": {"title": "Save and callback"},
    },
}


def use_repo_package() -> None:
    """Import `comfy_courier` from this checkout (not whatever copy pip installed), and
    make tests/ importable for the stand-in and the fake storage server."""
    mod = sys.modules.get("comfy_courier")
    if mod is None or Path(getattr(mod, "__file__", "") or "").resolve().parent != REPO:
        stale = [n for n in sys.modules if n == "comfy_courier" or n.startswith("comfy_courier.")]
        for name in stale:
            del sys.modules[name]
        spec = importlib.util.spec_from_file_location(
            "comfy_courier", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
        )
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["comfy_courier"] = module
        spec.loader.exec_module(module)
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def workflow(name: str) -> dict[str, Any]:
    """A sample workflow from shared/workflows (model-free is embedded as a fallback)."""
    path = SHARED_WORKFLOWS / name
    if path.exists():
        return json.loads(path.read_text())
    if name == "model-free.json":
        return json.loads(json.dumps(MODEL_FREE))
    raise FileNotFoundError(path)


# -- command line and machine -----------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI-sized run (fewer samples); still prints every ratio",
    )
    parser.add_argument(
        "--comfy-dir",
        default=os.environ.get("COMFYUI_DIR"),
        help="real ComfyUI checkout (default: $COMFYUI_DIR); unset = stand-in",
    )
    parser.add_argument(
        "--standin", action="store_true", help="use the stand-in even when COMFYUI_DIR is set"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    return parser


def comfy_dir_of(args: argparse.Namespace) -> Path | None:
    return None if args.standin or not args.comfy_dir else Path(args.comfy_dir)


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


def machine_facts() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem": mem,
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def print_header(title: str, target_desc: str, args: argparse.Namespace) -> dict[str, Any]:
    facts = machine_facts()
    comfy = comfy_dir_of(args)
    print(f"== {title}")
    print(f"   target : {target_desc}")
    print(f"   server : {comfy_version(comfy)}{' [quick]' if args.quick else ''}")
    print(
        f"   machine: nproc={facts['nproc']} cpu={facts['cpu']!r} mem={facts['mem']} "
        f"python={facts['python']} load1={facts['loadavg_at_start']:.2f}"
    )
    facts["server"] = comfy_version(comfy)
    facts["quick"] = bool(args.quick)
    return facts


def write_json(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))


# -- statistics and tables --------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Percentile q (0..100) by linear interpolation."""
    if not values:
        return float("nan")
    data = sorted(values)
    k = (len(data) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def p50(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = ["   " + line, "   " + "  ".join("-" * w for w in widths)]
    out += ["   " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def verdict(ok: bool) -> str:
    return "MEETS" if ok else "MISSES"


# -- processes --------------------------------------------------------------------------


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


def http_json(
    url: str,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def _stop_process(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Peers:
    """peers.py: fake Supabase Storage + callback receiver + a control API."""

    process: subprocess.Popen[bytes]
    storage_url: str
    control_url: str

    @property
    def callback_url(self) -> str:
        return f"{self.control_url}/callback"

    def supabase_env(self) -> dict[str, str]:
        """The courier's settings for uploading here and calling back here."""
        return {
            "COURIER_STORAGE": "supabase",
            "SUPABASE_URL": self.storage_url,
            "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
            "COURIER_CALLBACK_URL": self.callback_url,
        }

    def set_delay(self, seconds: float) -> None:
        http_json(f"{self.control_url}/delay", "POST", {"seconds": seconds})

    def callbacks(self, since: int = 0) -> list[dict[str, Any]]:
        return list(http_json(f"{self.control_url}/callbacks?since={since}")[1])

    def stats(self) -> dict[str, Any]:
        return dict(http_json(f"{self.control_url}/stats")[1])

    def stop(self) -> None:
        _stop_process(self.process, 5)


def start_peers(log: Path) -> Peers:
    process = subprocess.Popen(
        [sys.executable, str(BENCH / "peers.py"), "--service-key", SERVICE_KEY, "--bucket", BUCKET],
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("READY "):
        _stop_process(process, 2)
        raise RuntimeError(f"peers did not start: {line!r}; see {log}")
    info = json.loads(line[6:])
    return Peers(process, info["storage_url"], info["control_url"])


@dataclass
class Server:
    """A ComfyUI (real or stand-in) with this package loaded, in its own process."""

    kind: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    base: Path
    db: Path
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
        _stop_process(self.process)

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


def blocker_workflow(seconds: float, standin: bool) -> dict[str, Any]:
    """A job that holds ComfyUI's worker for `seconds` without using the CPU."""
    sleep = "BlockingNode" if standin else "CourierBenchSleep"
    output = "PreviewImage"
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "2": {"class_type": sleep, "inputs": {"images": ["1", 0], "seconds": seconds}},
        "3": {"class_type": output, "inputs": {"images": ["2", 0]}},
    }


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
    db = base / "courier.sqlite3"
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
        db = Path(environ["COURIER_DB"])
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
        sys.path.insert(0, str(BENCH))
        from bench_node import loader_source

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


class TempDir:
    """A temp folder removed at exit unless --keep."""

    def __init__(self, keep: bool, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self.keep = keep

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        if self.keep:
            print(f"   (kept {self.path})")
        else:
            import shutil

            shutil.rmtree(self.path, ignore_errors=True)


# -- a lean HTTP/1.1 keep-alive client (so the load generator costs little CPU) ----------


class RawClient:
    """One keep-alive connection; `request()` returns (status, body bytes)."""

    def __init__(self, url: str) -> None:
        rest = url.split("://", 1)[1]
        host, _, port = rest.partition(":")
        self.host = host
        self.port = int(port.split("/")[0])
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        if self.writer is None or self.writer.is_closing():
            await self._connect()
        assert self.reader is not None and self.writer is not None
        head = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Content-Length: {len(body)}",
        ]
        if body:
            head.append("Content-Type: application/json")
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        raw_head = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        if "content-length" in hdrs:
            data = await self.reader.readexactly(int(hdrs["content-length"]))
        elif hdrs.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            data = b"".join(parts)
        else:
            data = await self.reader.read()
        if hdrs.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self.writer = None


def courier_body(wf: dict[str, Any], cid: str) -> bytes:
    return json.dumps({"workflow_json": wf, "content_request_id": cid}).encode()


def prompt_body(wf: dict[str, Any], client_id: str | None = None) -> bytes:
    body: dict[str, Any] = {"prompt": wf}
    if client_id:
        body["client_id"] = client_id
    return json.dumps(body).encode()


COURIER_HEADERS = {"X-API-Key": API_KEY}


def unique_id(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns()}-{random.randrange(1 << 30)}"


class JournalReader:
    """A second connection to the courier's journal: sees only committed rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def committed(self, prompt_id: str) -> bool:
        if self._db is None:
            self._db = sqlite3.connect(str(self.path), timeout=10)
        row = self._db.execute("SELECT 1 FROM jobs WHERE prompt_id = ?", (prompt_id,)).fetchone()
        return row is not None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


# -- ComfyUI's websocket: when the history entry exists ------------------------------------


class HistoryWatcher:
    """Connects to /ws?clientId=…; ComfyUI sends `executing` with node None right after
    task_done wrote the history entry. Records time.monotonic() of that message."""

    def __init__(self, url: str, client_id: str) -> None:
        self.url = url
        self.client_id = client_id
        self.done: dict[str, float] = {}
        self._waiters: dict[str, asyncio.Future[float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: Any = None

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession()
        ws = await self._session.ws_connect(
            f"{self.url}/ws?clientId={self.client_id}", max_msg_size=0
        )
        self._task = asyncio.ensure_future(self._read(ws))

    async def _read(self, ws: Any) -> None:
        import aiohttp

        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            now = time.monotonic()
            data = json.loads(msg.data)
            if data.get("type") == "executing" and data["data"].get("node") is None:
                pid = data["data"].get("prompt_id")
                if pid:
                    self.done[pid] = now
                    waiter = self._waiters.pop(pid, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(now)

    async def wait(self, prompt_id: str, timeout: float = 60.0) -> float:
        if prompt_id in self.done:
            return self.done[prompt_id]
        fut = asyncio.get_running_loop().create_future()
        self._waiters[prompt_id] = fut
        return await asyncio.wait_for(fut, timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._session is not None:
            await self._session.close()


def history_span(entry: dict[str, Any]) -> tuple[int | None, int | None]:
    """(execution_start, execution_success/error) timestamps in ms from a history entry."""
    start = end = None
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
    return start, end
