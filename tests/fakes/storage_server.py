"""An in-memory Supabase Storage server for tests.

The real ``supabase`` client (``acreate_client`` / ``AsyncClient``, storage3) talks to it unchanged
over a loopback socket, so tests exercise the real request building and error parsing instead of a
mock that only mirrors our own assumptions. The wire shapes follow /work/shared/supabase-storage.md
(observed against Storage v1.70) and storage3 2.34's source:

* every client-visible error is **HTTP 400** with ``{"statusCode": "<code>", "error", "message"}``;
  storage3 turns it into ``StorageApiError(status='<code>')`` (a *string*);
* only the injected faults answer a real 5xx, hang, or drop the connection.

Usage::

    state = FakeStorage(service_key="service-key")
    state.add_bucket("outputs", public=True)
    async with running_storage_server(state) as base_url:
        client = await acreate_client(base_url, "service-key")
        ...
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote

from aiohttp import BodyPartReader, hdrs, web

__all__ = [
    "Bucket",
    "FakeStorage",
    "StoredObject",
    "UploadRecord",
    "make_storage_app",
    "running_storage_server",
    "start_storage_server",
]

#: Headers never copied into :class:`UploadRecord` (they carry the key).
SECRET_HEADERS = frozenset({"authorization", "apikey", "cookie"})
#: Same default as Storage's standard upload limit; aiohttp's own default (1 MiB) is too small.
MAX_BODY = 50 * 1024 * 1024


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Bucket:
    id: str
    public: bool = False
    file_size_limit: int | None = None
    allowed_mime_types: list[str] | None = None
    created_at: datetime = field(default_factory=_utcnow)

    def as_json(self) -> dict[str, Any]:
        """The row shape storage3 validates into ``BaseBucket``."""
        return {
            "id": self.id, "name": self.id, "owner": "", "public": self.public,
            "type": "STANDARD", "file_size_limit": self.file_size_limit,
            "allowed_mime_types": self.allowed_mime_types,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.created_at.isoformat(),
        }


@dataclass
class StoredObject:
    data: bytes
    content_type: str
    cache_control: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    updated_at: datetime = field(default_factory=_utcnow)

    @property
    def etag(self) -> str:
        return f'"{hashlib.md5(self.data).hexdigest()}"'  # Storage answers an S3-style md5 etag


@dataclass
class UploadRecord:
    """One upload request as received (including faulted ones), for assertions like
    "the retry used upsert"."""

    method: str
    bucket: str
    path: str
    content_type: str | None
    size: int
    upsert: bool
    cache_control: str | None
    headers: dict[str, str]
    status: int | None = None  # HTTP status answered; None if dropped or still hanging
    body_status: str | None = None  # the JSON body's statusCode for 400-style errors


class StorageError(Exception):
    """An error Storage reports as HTTP 400 with the real code only in the JSON body."""

    def __init__(self, status: str, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


def _not_found() -> StorageError:
    return StorageError("404", "not_found", "Object not found")


def _bucket_not_found() -> StorageError:
    return StorageError("404", "Bucket not found", "Bucket not found")


@dataclass
class FakeStorage:
    """Buckets, objects and fault knobs, all inspectable and adjustable from the test."""

    service_key: str = "service-role-key"
    buckets: dict[str, Bucket] = field(default_factory=dict)
    objects: dict[tuple[str, str], StoredObject] = field(default_factory=dict)
    uploads: list[UploadRecord] = field(default_factory=list)
    #: Every request reaching the server as (method, path), including non-storage paths
    #: (e.g. /auth/v1/...), so tests can prove a client did no I/O it should not.
    requests: list[tuple[str, str]] = field(default_factory=list)
    #: Seconds to sleep (asynchronously) before answering each upload.
    delay_uploads: float = 0.0
    #: Hold uploads unanswered until :meth:`release` or server stop, so the client times out.
    #: Released uploads are then processed normally: the object may land although the client
    #: saw a timeout (as with real Storage), which is why retries must upsert.
    hang_uploads: bool = False
    #: Clock used for signed-URL expiry; replace to test expiry without sleeping.
    clock: Callable[[], float] = time.time
    signing_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _fail: list[tuple[int, str | dict[str, Any] | None]] = field(default_factory=list)
    _drop: int = 0
    _released: asyncio.Event | None = field(default=None, repr=False)

    # -- setup and inspection -------------------------------------------------------------------
    def add_bucket(self, bucket_id: str, *, public: bool = False,
                   file_size_limit: int | None = None,
                   allowed_mime_types: list[str] | None = None) -> Bucket:
        bucket = Bucket(bucket_id, public, file_size_limit, allowed_mime_types)
        self.buckets[bucket_id] = bucket
        return bucket

    def get(self, bucket: str, path: str) -> StoredObject | None:
        return self.objects.get((bucket, path))

    @property
    def upload_count(self) -> int:
        """Upload requests received, faulted ones included (``len(objects)`` counts stored)."""
        return len(self.uploads)

    # -- fault injection -------------------------------------------------------------------------
    def fail_next(self, n: int = 1, status: int = 503,
                  body: str | dict[str, Any] | None = None) -> None:
        """Answer the next ``n`` uploads with a real HTTP ``status`` (after reading the body).

        ``body=None`` sends a plain-text body, as a gateway/proxy would: storage3 then raises
        ``StorageApiError(code='InternalError', status=<int status>)``. Pass a dict such as
        ``{"statusCode": "500", "error": "internal", "message": "..."}`` to mimic Storage's own
        500 body; then ``.status`` is the body's string.
        """
        self._fail.extend([(status, body)] * n)

    def drop_next(self, n: int = 1) -> None:
        """Close the connection of the next ``n`` uploads without answering
        (httpx raises ``RemoteProtocolError``)."""
        self._drop += n

    def release(self) -> None:
        """Let uploads held by :attr:`hang_uploads` finish (their clients have usually gone)."""
        self.hang_uploads = False
        event, self._released = self._released, None
        if event is not None:
            event.set()

    # -- signed URLs: an HS256 JWT like the real server's, {"url": "bucket/path", "exp"} -----------
    def sign(self, bucket: str, path: str, expires_in: int) -> str:
        now = int(self.clock())
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = _b64url(json.dumps({"url": f"{bucket}/{path}", "iat": now,
                                     "exp": now + expires_in}).encode())
        mac = hmac.new(self.signing_secret, f"{header}.{claims}".encode(), hashlib.sha256)
        return f"{header}.{claims}.{_b64url(mac.digest())}"

    def verify(self, token: str, bucket: str, path: str) -> None:
        try:
            header, claims, sig = token.split(".")
            expected = hmac.new(self.signing_secret, f"{header}.{claims}".encode(),
                                hashlib.sha256).digest()
            valid = hmac.compare_digest(expected, _b64url_decode(sig))
            payload = json.loads(_b64url_decode(claims)) if valid else {}
        except ValueError:
            valid, payload = False, {}
        if not valid:
            raise StorageError("400", "InvalidJWT", "invalid signature")
        if payload.get("url") != f"{bucket}/{path}":
            raise StorageError("400", "InvalidSignature", "The url do not match the signature")
        if payload.get("exp", 0) <= self.clock():
            raise StorageError("400", "InvalidJWT", "jwt expired")


# -- HTTP layer ---------------------------------------------------------------------------------
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(err: StorageError) -> web.Response:
    body = {"statusCode": err.status, "error": err.error, "message": err.message}
    return web.json_response(body, status=400)


def _object_response(obj: StoredObject) -> web.Response:
    return web.Response(body=obj.data, headers={
        hdrs.CONTENT_TYPE: obj.content_type,
        hdrs.CACHE_CONTROL: f"max-age={obj.cache_control}",
        hdrs.ETAG: obj.etag,
        hdrs.LAST_MODIFIED: format_datetime(obj.updated_at, usegmt=True),
    })


def make_storage_app(state: FakeStorage) -> web.Application:
    """Build the aiohttp application serving ``/storage/v1/...`` from ``state``."""

    def check_auth(request: web.Request) -> None:
        # The client sends both; a wrong or missing key is a 403 "Unauthorized" in the body.
        bearer = request.headers.get(hdrs.AUTHORIZATION, "")
        apikey = request.headers.get("apikey", state.service_key)
        if bearer != f"Bearer {state.service_key}" or apikey != state.service_key:
            raise StorageError("403", "Unauthorized", "invalid signature")

    def bucket_of(name: str) -> Bucket:
        if name not in state.buckets:
            raise _bucket_not_found()
        return state.buckets[name]

    def object_of(bucket: str, path: str) -> StoredObject:
        bucket_of(bucket)
        obj = state.get(bucket, path)
        if obj is None:
            raise _not_found()
        return obj

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        state.requests.append((request.method, request.path))
        try:
            return await handler(request)
        except StorageError as err:
            return _error_response(err)

    async def upload(request: web.Request) -> web.StreamResponse:
        bucket, path = request.match_info["bucket"], request.match_info["path"]
        fields: dict[str, str] = {}
        data, content_type = b"", None
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue  # nested multipart: the client never sends one
            if part.name == "file":
                content_type = part.headers.get(hdrs.CONTENT_TYPE)
                data = await part.read()
            elif part.name:
                fields[part.name] = await part.text()
        upsert = request.method == "POST" and request.headers.get("x-upsert") == "true"
        record = UploadRecord(
            request.method, bucket, path, content_type, len(data), upsert,
            fields.get("cacheControl"),
            {k: v for k, v in request.headers.items() if k.lower() not in SECRET_HEADERS})
        state.uploads.append(record)
        response = await _faulted_upload(request, record) or _store(request, record, data)
        record.status = response.status
        return response

    async def _faulted_upload(request: web.Request, record: UploadRecord) -> web.Response | None:
        if state.delay_uploads:
            await asyncio.sleep(state.delay_uploads)
        if state.hang_uploads:
            event = state._released = state._released or asyncio.Event()
            await event.wait()
        if state._drop:
            state._drop -= 1
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing can be sent; end the handler quietly
        if state._fail:
            status, body = state._fail.pop(0)
            if isinstance(body, dict):
                return web.json_response(body, status=status)
            return web.Response(status=status, text=body or "upstream unavailable")
        return None

    def _store(request: web.Request, record: UploadRecord, data: bytes) -> web.Response:
        try:
            check_auth(request)
            bucket = bucket_of(record.bucket)
            key = (record.bucket, record.path)
            if request.method == "PUT" and key not in state.objects:
                raise _not_found()
            if request.method == "POST" and key in state.objects and not record.upsert:
                raise StorageError("409", "Duplicate", "The resource already exists")
            if bucket.file_size_limit is not None and len(data) > bucket.file_size_limit:
                raise StorageError("413", "Payload too large",
                                   "The object exceeded the maximum allowed size")
            ctype = record.content_type or "application/octet-stream"
            if bucket.allowed_mime_types is not None and ctype not in bucket.allowed_mime_types:
                raise StorageError(
                    "415", "invalid_mime_type", f"mime type {ctype} is not supported"
                )
        except StorageError as err:
            record.body_status = err.status
            return _error_response(err)
        obj = StoredObject(data, ctype, record.cache_control or "3600")
        state.objects[key] = obj
        return web.json_response({"Key": f"{record.bucket}/{record.path}", "Id": obj.id})

    async def download(request: web.Request) -> web.StreamResponse:
        check_auth(request)
        return _object_response(object_of(request.match_info["bucket"], request.match_info["path"]))

    async def info(request: web.Request) -> web.StreamResponse:
        check_auth(request)
        bucket, path = request.match_info["bucket"], request.match_info["path"]
        obj = object_of(bucket, path)
        return web.json_response({
            "id": obj.id, "name": path, "bucket_id": bucket, "size": len(obj.data),
            "content_type": obj.content_type, "cache_control": f"max-age={obj.cache_control}",
            "etag": obj.etag, "last_modified": obj.updated_at.isoformat(),
            "created_at": obj.updated_at.isoformat(), "updated_at": obj.updated_at.isoformat()})

    async def public_get(request: web.Request) -> web.StreamResponse:
        bucket, path = request.match_info["bucket"], request.match_info["path"]
        if not bucket_of(bucket).public:
            raise _not_found()  # Storage hides private objects behind a plain "not found"
        return _object_response(object_of(bucket, path))

    async def sign(request: web.Request) -> web.StreamResponse:
        check_auth(request)
        bucket, path = request.match_info["bucket"], request.match_info["path"]
        object_of(bucket, path)
        body = await request.json()
        token = state.sign(bucket, path, int(body["expiresIn"]))
        return web.json_response(
            {"signedURL": f"/object/sign/{bucket}/{quote(path)}?token={token}"})

    async def signed_get(request: web.Request) -> web.StreamResponse:
        bucket, path = request.match_info["bucket"], request.match_info["path"]
        state.verify(request.query.get("token", ""), bucket, path)
        return _object_response(object_of(bucket, path))

    async def remove(request: web.Request) -> web.StreamResponse:
        check_auth(request)
        bucket = request.match_info["bucket"]
        bucket_of(bucket)
        removed = []
        for path in (await request.json()).get("prefixes", []):
            obj = state.objects.pop((bucket, path), None)
            if obj is not None:
                removed.append({"id": obj.id, "name": path, "bucket_id": bucket,
                                "metadata": {"size": len(obj.data), "mimetype": obj.content_type}})
        return web.json_response(removed)

    async def create_bucket(request: web.Request) -> web.StreamResponse:
        check_auth(request)
        body: Mapping[str, Any] = await request.json()
        if body["id"] in state.buckets:
            raise StorageError("409", "Duplicate", "The resource already exists")
        state.add_bucket(body["id"], public=bool(body.get("public", False)),
                         file_size_limit=body.get("file_size_limit"),
                         allowed_mime_types=body.get("allowed_mime_types"))
        return web.json_response({"name": body["id"]})

    async def list_buckets(request: web.Request) -> web.StreamResponse:
        check_auth(request)
        return web.json_response([b.as_json() for b in state.buckets.values()])

    async def get_bucket(request: web.Request) -> web.StreamResponse:
        check_auth(request)
        return web.json_response(bucket_of(request.match_info["id"]).as_json())

    async def update_bucket(request: web.Request) -> web.StreamResponse:
        check_auth(request)
        bucket = bucket_of(request.match_info["id"])
        body: Mapping[str, Any] = await request.json()
        if "public" in body:
            bucket.public = bool(body["public"])
        if "file_size_limit" in body:
            bucket.file_size_limit = body["file_size_limit"]
        if "allowed_mime_types" in body:
            bucket.allowed_mime_types = body["allowed_mime_types"]
        return web.json_response({"message": "Successfully updated"})

    async def unknown(request: web.Request) -> web.StreamResponse:
        raise StorageError("404", "not_found", f"Route {request.method}:{request.path} not found")

    app = web.Application(middlewares=[middleware], client_max_size=MAX_BODY)
    r, v1 = app.router, "/storage/v1"
    # Specific prefixes first: aiohttp matches in registration order and /object/{bucket}/...
    # would otherwise swallow /object/sign/..., /object/public/... and /object/info/....
    r.add_get(v1 + "/object/public/{bucket}/{path:.+}", public_get)
    r.add_post(v1 + "/object/sign/{bucket}/{path:.+}", sign)
    r.add_get(v1 + "/object/sign/{bucket}/{path:.+}", signed_get)
    r.add_get(v1 + "/object/info/{bucket}/{path:.+}", info)
    r.add_post(v1 + "/object/{bucket}/{path:.+}", upload)
    r.add_put(v1 + "/object/{bucket}/{path:.+}", upload)
    r.add_get(v1 + "/object/{bucket}/{path:.+}", download)
    r.add_delete(v1 + "/object/{bucket}", remove)
    r.add_post(v1 + "/bucket", create_bucket)
    r.add_get(v1 + "/bucket", list_buckets)
    r.add_get(v1 + "/bucket/{id}", get_bucket)
    r.add_put(v1 + "/bucket/{id}", update_bucket)
    r.add_route("*", "/{tail:.*}", unknown)
    return app


async def start_storage_server(
    state: FakeStorage, host: str = "127.0.0.1",
) -> tuple[str, Callable[[], Awaitable[None]]]:
    """Serve ``state`` on a real loopback socket (port chosen by the OS).

    Returns ``(base_url, stop)``; pass ``base_url`` as the Supabase URL. ``stop`` releases any
    hanging uploads first so shutdown does not wait for them.
    """
    runner = web.AppRunner(make_storage_app(state), shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = runner.addresses[0][1]

    async def stop() -> None:
        state.release()
        await runner.cleanup()

    return f"http://{host}:{port}", stop


@asynccontextmanager
async def running_storage_server(state: FakeStorage) -> AsyncIterator[str]:
    """``async with running_storage_server(state) as base_url:`` — stops the server on exit."""
    base_url, stop = await start_storage_server(state)
    try:
        yield base_url
    finally:
        await stop()
