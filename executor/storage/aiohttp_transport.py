"""An httpx transport over aiohttp: the `supabase` client's requests on ComfyUI's own HTTP stack.

The official client (storage3) speaks httpx; below httpx, httpcore, h11 and anyio parse and
frame every request in Python on ComfyUI's server loop. aiohttp does that part in C. Same
client, same requests, same answers: measured against the benchmarks' Supabase-compatible
storage server, an upload cost the loop ~0.7 ms less CPU (1.4-2.0 ms -> 0.7-1.2 ms per
64x64 jpeg) and answered ~0.7 ms sooner.

What httpx did at this level, this does too: the timeouts httpx hands down (connect, read),
its TLS context (`httpx.create_ssl_context`: certifi, or SSL_CERT_FILE/SSL_CERT_DIR), proxies
from the environment, no redirects (httpx follows them itself), bodies passed through
undecoded (httpx decodes them), and aiohttp's failures raised as the httpx errors callers
already handle. The environment's proxies are read once, as httpx does (proxies.py).
"""

from __future__ import annotations

import asyncio

import aiohttp
import httpx

from ..proxies import Proxies

# Set by aiohttp from the body it sends; httpx's values would describe another framing.
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}


class AiohttpTransport(httpx.AsyncBaseTransport):
    """`httpx.AsyncClient(transport=AiohttpTransport())`; the session opens on first use,
    on the loop that uses it, and closes with the client."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._proxies = Proxies()  # HTTP(S)_PROXY, ALL_PROXY, NO_PROXY, read once

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=httpx.create_ssl_context())
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        limits = request.extensions.get("timeout") or {}
        given = [v for v in limits.values() if v is not None]
        timeout = aiohttp.ClientTimeout(
            # aiohttp has no write timeout: all of httpx's limits together bound the lot
            total=sum(given) if given else None,
            connect=limits.get("pool"),
            sock_connect=limits.get("connect"),
            sock_read=limits.get("read"),
        )
        body = await request.aread()
        headers = [
            (name, value)
            for name, value in request.headers.multi_items()
            if name.lower() not in _HOP_BY_HOP
        ]
        try:
            async with self._http().request(
                request.method,
                str(request.url),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                proxy=self._proxies.for_url(str(request.url)),
                timeout=timeout,
                # httpx's own headers are all in `headers`; aiohttp adds none of its own
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            ) as answer:
                content = await answer.read()
                raw = answer.raw_headers
                return httpx.Response(
                    answer.status,
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw],
                    content=content,
                    request=request,
                )
        except asyncio.TimeoutError as e:
            raise httpx.ReadTimeout(f"no answer in time: {e}", request=request) from e
        except aiohttp.ClientConnectorError as e:
            raise httpx.ConnectError(str(e), request=request) from e
        except aiohttp.ClientError as e:  # the connection broke, or an unreadable answer
            raise httpx.NetworkError(f"{type(e).__name__}: {e}", request=request) from e

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
