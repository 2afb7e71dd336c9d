"""HTTP routes of comfy-courier, added to ComfyUI's route table (ComfyUI adds the /api alias).

`add_routes(routes, get_courier, settings)` takes any aiohttp RouteTableDef, so tests
mount the same handlers on a plain application.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .executor import redelivery
from .executor.courier import Courier
from .executor.errors import (
    CourierError,
    NotConfigured,
    PayloadTooLarge,
    QueueFull,
    StoreError,
    Unauthorized,
    Unavailable,
)
from .executor.intake import check_id, parse_request
from .executor.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .executor.settings import Settings
from .openapi import PATH as OPENAPI_PATH
from .openapi import document as openapi_document

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
REDELIVER_BODY_LIMIT = 64 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: CourierError) -> web.Response:
    """The one mapping from courier errors to HTTP answers."""
    headers = {}
    if isinstance(error, QueueFull):
        headers["Retry-After"] = str(error.retry_after)
    return web.json_response(error.body(), status=error.status, headers=headers)


def key_matches(given: str | None, accepted: tuple[str, ...]) -> bool:
    """Constant-time check against every accepted key (rotation keeps several valid)."""
    if not given:
        return False
    # aiohttp decodes header bytes that are not UTF-8 as surrogate escapes: never raise on them
    given_bytes = given.encode("utf-8", "surrogatepass")
    matched = False
    for key in accepted:
        matched |= hmac.compare_digest(given_bytes, key.encode("utf-8", "surrogatepass"))
    return matched


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The body, refusing anything over `limit` before it is all read or parsed."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body is larger than the {limit} byte limit (COURIER_MAX_BODY_MB)")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(65536)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"body is larger than the {limit} byte limit (COURIER_MAX_BODY_MB)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def add_routes(
    routes: web.RouteTableDef, get_courier: Callable[[], Courier | None], settings: Settings
) -> None:
    def guarded(
        handler: Callable[[web.Request, Courier], Awaitable[web.StreamResponse]],
    ) -> Handler:
        async def wrapper(request: web.Request) -> web.StreamResponse:
            try:
                if not settings.api_keys:
                    raise NotConfigured(
                        "comfy-courier has no inbound key configured (COURIER_API_KEY); "
                        "refusing all jobs until one is set"
                    )
                if not key_matches(request.headers.get("X-API-Key"), settings.api_keys):
                    raise Unauthorized("missing or invalid X-API-Key")
                courier = get_courier()
                if courier is None:
                    raise Unavailable("comfy-courier failed to start; see the ComfyUI log")
                return await handler(request, courier)
            except StoreError as e:  # the request may or may not be recorded: retry it
                log.error("[courier] %s %s: journal failed: %s", request.method, request.path, e)
                return error_response(
                    Unavailable(
                        "comfy-courier's job journal failed; retry with the same "
                        "content_request_id (a job already accepted is never run twice)"
                    )
                )
            except CourierError as e:
                return error_response(e)
            except Exception:
                log.exception("[courier] %s %s failed", request.method, request.path)
                return web.json_response(
                    {
                        "error": {
                            "type": "internal_error",
                            "message": "internal error; see the ComfyUI log",
                        },
                        "node_errors": {},
                    },
                    status=500,
                )

        return wrapper

    async def until_ready(courier: Courier) -> None:
        if courier.ready.is_set():
            return
        if courier.twin:
            raise Unavailable(
                "another live process runs under this comfy-courier's instance name; this "
                "one stands by until it stops (give each process its own COURIER_INSTANCE)"
            )
        waiter = asyncio.ensure_future(courier.ready.wait())
        try:
            await asyncio.wait({waiter}, timeout=READY_TIMEOUT)
        finally:
            waiter.cancel()
        if not courier.ready.is_set():
            raise Unavailable("comfy-courier is still starting; try again shortly")

    @routes.post("/execute-workflow")
    @guarded
    async def execute_workflow(request: web.Request, courier: Courier) -> web.StreamResponse:
        raw = await read_limited(request, settings.max_body_bytes)
        job_request = parse_request(raw)
        await until_ready(courier)
        status, body = await courier.submit(job_request)
        return web.json_response(body, status=status)

    @routes.get("/execute-workflow/{content_request_id}")
    @guarded
    async def get_status(request: web.Request, courier: Courier) -> web.StreamResponse:
        cid = _path_id(request)
        await until_ready(courier)
        return web.json_response(await courier.status(cid))

    @routes.delete("/execute-workflow/{content_request_id}")
    @guarded
    async def cancel(request: web.Request, courier: Courier) -> web.StreamResponse:
        cid = _path_id(request)
        await until_ready(courier)
        return web.json_response(await courier.cancel(cid), status=202)

    @routes.post("/courier/redeliver")
    @guarded
    async def redeliver(request: web.Request, courier: Courier) -> web.StreamResponse:
        """Dead-lettered callbacks sent again under their webhook-id: one job's
        (`{"content_request_id"}`) or every one dead since a time (`{"since"}`)."""
        raw = await read_limited(request, REDELIVER_BODY_LIMIT)
        cid, since = redelivery.parse_request(raw)
        await until_ready(courier)
        events = await courier.redeliver(content_request_id=cid, dead_since=since)
        return web.json_response(redelivery.answer(events))

    @routes.get("/courier/metrics")
    async def metrics(request: web.Request) -> web.StreamResponse:
        """Prometheus text format; the inbound key or COURIER_METRICS_KEY opens it."""
        accepted = settings.api_keys + settings.metrics_keys
        try:
            if not accepted:
                raise NotConfigured("no COURIER_API_KEY or COURIER_METRICS_KEY configured")
            given = request.headers.get("X-API-Key")
            bearer = request.headers.get("Authorization", "")
            if bearer.startswith("Bearer "):
                given = given or bearer[len("Bearer ") :]
            if not key_matches(given, accepted):
                raise Unauthorized("missing or invalid X-API-Key")
            courier = get_courier()
            if courier is None:
                raise Unavailable("comfy-courier failed to start; see the ComfyUI log")
        except CourierError as e:
            return error_response(e)
        return web.Response(
            body=await courier.metrics_text(), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    @routes.get("/courier/health")
    async def health(request: web.Request) -> web.StreamResponse:
        courier = get_courier()
        body: dict[str, Any]
        if courier is None:
            body = {"ok": False, "ready": False, "reason": "comfy-courier failed to start"}
            return web.json_response(body, status=503)
        body = await courier.health()
        body["inbound_key_configured"] = bool(settings.api_keys)
        return web.json_response(body, status=200 if body["ok"] else 503)

    openapi_text = json.dumps(openapi_document(), indent=1)

    @routes.get(OPENAPI_PATH)
    async def openapi(request: web.Request) -> web.StreamResponse:
        """The OpenAPI 3.1 description of these routes and the callbacks; no key, no secrets."""
        return web.Response(text=openapi_text, content_type="application/json")


def _path_id(request: web.Request) -> str:
    return check_id(request.match_info["content_request_id"])
