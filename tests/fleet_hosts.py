"""Courier hosts as separate processes on one database: the ComfyUI stand-in with the
courier wired from the environment (benchmarks/standin_server.py), one per host, for the
multi-host tests and benchmarks. Each host logs to `<folder>/host<i>.log`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from pgcluster import free_port

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "benchmarks" / "standin_server.py"


class Host:
    def __init__(self, index: int, folder: Path, env: dict[str, str], schedule: str | None,
                 extra: tuple[str, ...] = ()):
        self.index = index
        self.name = f"host-{index}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / f"host{index}.log"
        self.base = folder / f"host{index}"
        args = [sys.executable, str(SERVER), "--port", str(self.port), "--base", str(self.base)]
        if schedule:
            args += ["--schedule", schedule]
        args += extra
        self._out = self.log.open("wb")
        self.process = subprocess.Popen(
            args, env={**os.environ, **env, "COURIER_INSTANCE": self.name},
            stdout=self._out, stderr=subprocess.STDOUT,
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.process.pid, sig)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()


class Fleet:
    """`Fleet(folder, env)`, then `start(n)`; `client(i)` talks to host i (1-based)."""

    def __init__(self, folder: Path, env: dict[str, str], api_key: str,
                 schedule: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.folder = folder
        self.extra = extra  # more standin_server.py arguments (--probe)
        self.env = env
        self.api_key = api_key
        self.schedule = schedule
        self.hosts: list[Host] = []
        self._clients: dict[int, httpx.AsyncClient] = {}

    def start(self, n: int) -> list[Host]:
        """Start n more hosts at once (they migrate an empty schema together)."""
        first = len(self.hosts) + 1
        new = [Host(i, self.folder, self.env, self.schedule, self.extra)
               for i in range(first, first + n)]
        self.hosts += new
        return new

    def host(self, index: int) -> Host:
        return self.hosts[index - 1]

    def client(self, index: int) -> httpx.AsyncClient:
        if index not in self._clients:
            self._clients[index] = httpx.AsyncClient(
                base_url=self.host(index).url, headers={"X-API-Key": self.api_key}, timeout=30
            )
        return self._clients[index]

    async def ready(self, *indexes: int, timeout: float = 60.0) -> None:
        """Wait until each host answers health with ready: true."""
        for index in indexes or range(1, len(self.hosts) + 1):
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if (await self.client(index).get("/courier/health")).json().get("ready"):
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                if self.host(index).process.poll() is not None:
                    raise AssertionError(f"host {index} exited:\n{self.host(index).log_text()}")
                assert time.monotonic() < deadline, f"host {index} never became ready"
                await asyncio.sleep(0.05)

    async def post(self, index: int, workflow: dict[str, Any], cid: str) -> httpx.Response:
        return await self.client(index).post(
            "/execute-workflow", json={"workflow_json": workflow, "content_request_id": cid})

    async def status(self, index: int, cid: str) -> dict[str, Any]:
        response = await self.client(index).get(f"/execute-workflow/{cid}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def wait_final(self, index: int, cid: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = await self.status(index, cid)
            if body["state"] in ("success", "error"):
                return body
            assert time.monotonic() < deadline, f"{cid} not final after {timeout} s: {body}"
            await asyncio.sleep(0.02)

    async def wait_state(self, index: int, cid: str, state: str,
                         timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = await self.status(index, cid)
            if body["state"] == state:
                return body
            assert time.monotonic() < deadline, f"{cid} never {state}: {body}"
            await asyncio.sleep(0.02)

    async def ran_on(self, prompt_id: str) -> list[int]:
        """The hosts whose ComfyUI history has this prompt."""
        found = []
        for index, host in enumerate(self.hosts, start=1):
            if host.process.poll() is not None:
                continue
            try:
                history = (await self.client(index).get(f"/history/{prompt_id}")).json()
            except httpx.HTTPError:
                continue
            if prompt_id in history:
                found.append(index)
        return found

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        for host in self.hosts:
            host.stop()
