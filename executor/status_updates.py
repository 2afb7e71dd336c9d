"""Optional intermediate updates (`queued`, `running` with progress) to COURIER_STATUS_URL.

Best effort by design: one try with a short timeout, throttled per job, never retried for
long, never awaited by the job, and never sent once the job's final event exists.

Sent over aiohttp, as callbacks are (delivery_send.py), not httpx: ComfyUI's own HTTP
stack, which frames and parses in C on the server loop where httpcore, h11 and anyio did
it in Python (measured on loopback: ~0.16 ms of the loop's CPU per update against ~0.71 ms
with httpx, ~0.41 ms with httpx over aiohttp_transport.py). Proxies from the environment
apply, read once (proxies.py); redirects are not followed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from .jobs import Job
from .proxies import Proxies
from .signing import signature_headers

log = logging.getLogger(__name__)

Key = tuple[str, int]


class StatusNotifier:
    def __init__(
        self,
        url: str,
        api_key: str | None,
        secrets: Sequence[str],
        interval: float = 1.0,
        timeout: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._headers = {"Content-Type": "application/json", "User-Agent": "comfy-courier"}
        if api_key:
            self._headers["X-API-Key"] = api_key
        self._secrets = tuple(secrets)
        self._interval = interval
        self._timeout = timeout
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._proxy: str | None = None
        self._last_sent: dict[Key, float] = {}
        self._last_state: dict[Key, str] = {}
        self._pending: dict[Key, dict[str, Any]] = {}
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._sending: dict[Key, asyncio.Task[None]] = {}
        self.sent = 0
        self.failed = 0

    def update(self, job: Job, state: str, progress: float | None) -> None:
        """Queue an update; a change of state goes now, progress at most once per interval."""
        key = (job.content_request_id, job.attempt)
        body = {
            "content_request_id": job.content_request_id,
            "status": state,
            "image_url": None,
            "error_message": None,
            "attempt": job.attempt,
            "prompt_id": job.prompt_id,
            "progress": None if progress is None else round(min(max(progress, 0.0), 1.0), 4),
        }
        self._pending[key] = body
        state_changed = self._last_state.get(key) != state
        wait = (
            0.0
            if state_changed
            else self._interval - (self._clock() - self._last_sent.get(key, -1e9))
        )
        if key in self._sending or key in self._timers:
            return  # the pending body goes out when the current send or timer ends
        if wait <= 0:
            self._send_pending(key)
        else:
            self._timers[key] = asyncio.get_running_loop().call_later(wait, self._send_pending, key)

    def close(self, job: Job) -> None:
        """The job is final: drop what is queued and stop what is in flight."""
        key = (job.content_request_id, job.attempt)
        self._pending.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        task = self._sending.pop(key, None)
        if task is not None:
            task.cancel()
        self._last_sent.pop(key, None)
        self._last_state.pop(key, None)

    def _send_pending(self, key: Key) -> None:
        self._timers.pop(key, None)
        body = self._pending.pop(key, None)
        if body is None:
            return
        self._last_sent[key] = self._clock()
        self._last_state[key] = str(body["status"])
        task = asyncio.ensure_future(self._send(body))
        self._sending[key] = task
        task.add_done_callback(lambda _: self._after_send(key, task))

    def _after_send(self, key: Key, task: asyncio.Task[None]) -> None:
        if self._sending.get(key) is task:
            del self._sending[key]
        if key in self._pending and key not in self._timers:
            wait = self._interval - (self._clock() - self._last_sent.get(key, -1e9))
            self._timers[key] = asyncio.get_running_loop().call_later(
                max(0.0, wait), self._send_pending, key
            )

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._proxy = Proxies().for_url(self._url)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout)
            )
        return self._session

    async def _send(self, body: dict[str, Any]) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        event_id = f"msg_{uuid.uuid4().hex}"
        headers = {**self._headers, **signature_headers(event_id, data, self._secrets)}
        try:
            async with self._http().post(
                self._url, data=data, headers=headers, allow_redirects=False, proxy=self._proxy
            ) as response:
                await response.read()  # the whole answer, so the connection is reused
                problem = f"HTTP {response.status}" if response.status >= 300 else None
        except asyncio.TimeoutError:
            problem = "no answer in time"
        except (aiohttp.ClientError, ValueError) as e:  # ValueError: an unusable URL
            problem = type(e).__name__
        if problem is None:
            self.sent += 1
            return
        self.failed += 1
        log.debug(
            "[courier] status update for %s not delivered: %s",
            body["content_request_id"],
            problem,
        )

    async def aclose(self) -> None:
        """Close the HTTP connections (at the courier's stop)."""
        if self._session is not None:
            await self._session.close()
