"""Keeps the courier's own httpx requests out of ComfyUI's INFO log.

httpx logs every request at INFO on the logger "httpx" (`HTTP Request: POST https://…/
storage/v1/object/<bucket>/<id>/1-1.jpg "HTTP/1.1 200 OK"`): one extra line per upload
and per status update, against the courier's one line per job. Other custom nodes use
httpx too, and their lines must stay, so the "httpx" logger keeps its level: a filter on
it drops only the records emitted while a `QuietAsyncClient` is sending (a context
variable, so a request another task makes at the same moment still logs). With the
courier's logger at DEBUG (ComfyUI's `--verbose DEBUG`) they show again.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

import httpx

log = logging.getLogger(__name__)

_SENDING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "comfy_courier_http_sending", default=False
)


class _DropOwnRequests(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _SENDING.get() or log.isEnabledFor(logging.DEBUG)


_FILTER = _DropOwnRequests()


def install_filter() -> None:
    """Add the filter to the "httpx" logger, once (it only drops our own records)."""
    logger = logging.getLogger("httpx")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


class QuietAsyncClient(httpx.AsyncClient):
    """An httpx.AsyncClient whose requests httpx does not log at INFO."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        install_filter()
        super().__init__(*args, **kwargs)

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        token = _SENDING.set(True)
        try:
            return await super().send(request, **kwargs)
        finally:
            _SENDING.reset(token)
