"""One try of a callback: the signed POST to the receiver, and the try's line in the log.

aiohttp, not httpx: it is ComfyUI's own HTTP stack, and a callback over it costs about
0.45 ms less of the server loop on loopback (benchmarks/bench_e2e.py). Proxies from the
environment apply, as they did with httpx: read once (proxies.py), not with aiohttp's
`trust_env`, which looks them up on a worker thread for every callback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import aiohttp

from .delivery_schedule import Outcome, Permanent, Retry, Write, classify
from .proxies import Proxies
from .signing import signature_headers
from .store import OutboxEvent

log = logging.getLogger(__name__)


class CallbackSender:
    """POSTs an event's body to the receiver: signed, no redirects followed, bounded by
    `timeout`; the answer as an `Outcome`. The session opens on first use, on the loop
    that uses it."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        secrets: Sequence[str],
        timeout: float,
        clock: Callable[[], float],
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._secrets = tuple(secrets)
        self._clock = clock  # wall: a Retry-After date is a wall-clock instant
        self._headers = {"Content-Type": "application/json", "User-Agent": "comfy-courier"}
        if api_key:
            self._headers["X-API-Key"] = api_key
        self._session: aiohttp.ClientSession | None = None
        self._proxy: str | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._proxy = Proxies().for_url(self.url)
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def send(self, event: OutboxEvent) -> Outcome:
        headers = {**self._headers, **signature_headers(event.event_id, event.body, self._secrets)}
        try:
            async with self._http().post(
                self.url,
                data=event.body,
                headers=headers,
                allow_redirects=False,
                proxy=self._proxy,
            ) as response:
                await response.read()  # the whole answer, so the connection is reused
                code, retry_after = response.status, response.headers.get("Retry-After")
                location = response.headers.get("Location")
        except asyncio.TimeoutError:
            return Retry(f"no answer within {self.timeout:g} s")
        except (aiohttp.ClientError, ValueError) as e:  # ValueError: an unusable URL
            return Retry(f"{type(e).__name__}: {e}"[:300])
        return classify(code, retry_after, self._clock(), location)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def log_outcome(event: OutboxEvent, write: Write, outcome: Outcome) -> None:
    """One line per try, at the level it deserves.

    A callback delivered at its first try is logged at DEBUG: the job's own INFO line
    (`[courier] success …` or `error …`, settle.py) already says the job ended, and a
    second INFO line per job cost ComfyUI's log handler ~37 µs of its server loop. A
    delivery after failed tries is at INFO (each failed try was a warning), a dead letter
    an error.
    """
    ids = (event.content_request_id, event.attempt, event.event_id)
    if write.state == "delivered":
        log.log(
            logging.INFO if write.attempts > 1 else logging.DEBUG,
            "[courier] callback delivered id=%s attempt=%s event=%s tries=%s",
            *ids,
            write.attempts,
        )
    elif isinstance(outcome, Permanent):
        log.error(
            "[courier] callback dead-lettered id=%s attempt=%s event=%s: receiver answered %s",
            *ids,
            outcome.reason,
        )
    elif write.state == "dead":
        log.error(
            "[courier] callback dead-lettered id=%s attempt=%s event=%s: retry horizon over (%s)",
            *ids,
            write.last_error,
        )
    else:
        log.warning(
            "[courier] callback try %s failed id=%s event=%s: %s; next in %.0f s",
            write.attempts,
            event.content_request_id,
            event.event_id,
            write.last_error,
            write.delay,
        )
