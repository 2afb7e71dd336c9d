"""The environment's proxies, read once, for the courier's aiohttp sessions.

httpx reads HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY once, when a client is made.
aiohttp's `trust_env=True` looks the proxy up, and ~/.netrc, on a worker thread for every
request: two thread hand-offs on ComfyUI's server loop per upload or callback, which cost
more than the request itself (measured: an upload's CPU 0.75-1.07 ms with trust_env,
0.51-0.79 ms with the proxies read once). The standard library reads the variables here
(urllib.request.getproxies), as it does for httpx and aiohttp.
"""

from __future__ import annotations

import urllib.request
from urllib.parse import urlsplit


class Proxies:
    def __init__(self) -> None:
        self._proxies = urllib.request.getproxies()

    def for_url(self, url: str) -> str | None:
        """The proxy a request to `url` goes through, None for a direct connection."""
        if not self._proxies:
            return None
        parts = urlsplit(url)
        if urllib.request.proxy_bypass(parts.hostname or ""):  # NO_PROXY
            return None
        return self._proxies.get(parts.scheme) or self._proxies.get("all")
