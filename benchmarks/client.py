"""The load generator's side of a run: HTTP to the server, what it sends, what it watches.

Timestamps that cross processes use time.monotonic() (CLOCK_MONOTONIC, system-wide on Linux).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from checkout import API_KEY


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


# -- what the benchmarks send -------------------------------------------------------------


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


async def submit_job(client: RawClient, wf: dict[str, Any], cid: str) -> str:
    """POST /execute-workflow; the accepted job's prompt_id (any answer but 202 raises)."""
    status, raw = await client.request(
        "POST", "/execute-workflow", courier_body(wf, cid), COURIER_HEADERS
    )
    if status != 202:
        raise RuntimeError(f"POST /execute-workflow -> {status}: {raw[:300]!r}")
    return str(json.loads(raw)["prompt_id"])


async def submit_prompt(client: RawClient, wf: dict[str, Any], client_id: str | None = None) -> str:
    """ComfyUI's POST /prompt; the queued prompt_id (any answer but 200 raises)."""
    status, raw = await client.request("POST", "/prompt", prompt_body(wf, client_id))
    if status != 200:
        raise RuntimeError(f"POST /prompt -> {status}: {raw[:300]!r}")
    return str(json.loads(raw)["prompt_id"])


# -- what the benchmarks watch: the journal's committed rows, ComfyUI's websocket ----------


class JournalReader:
    """A second connection to the courier's store: sees only committed rows.

    `path` is the SQLite journal, or a `postgresql://` URL (tables in `schema`)."""

    def __init__(self, path: Path | str, schema: str = "courier") -> None:
        self.path = path
        self.schema = schema
        self._db: Any = None

    def committed(self, prompt_id: str) -> bool:
        url = str(self.path)
        postgres = url.startswith(("postgresql://", "postgres://"))
        if self._db is None:
            if postgres:
                import psycopg

                self._db = psycopg.connect(url, autocommit=True)
            else:
                self._db = sqlite3.connect(url, timeout=10)
        if postgres:
            sql = f'SELECT 1 FROM "{self.schema}".jobs WHERE prompt_id = %s'
        else:
            sql = "SELECT 1 FROM jobs WHERE prompt_id = ?"
        return self._db.execute(sql, (prompt_id,)).fetchone() is not None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


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
