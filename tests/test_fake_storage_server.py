"""The fake Supabase Storage server, driven by the REAL supabase client (2.34 / storage3 2.34).

These tests pin two things the rest of the suite relies on: that the fake answers the way real
Storage does (as documented in /work/shared/supabase-storage.md), and how the real client surfaces
each kind of failure, because production retry logic has to classify exactly these exceptions:

* a Storage error (HTTP 400, real code in the JSON body) -> ``StorageApiError`` whose ``.status``
  is the body's ``statusCode`` **string** (``'409'``, ``'404'``, ``'403'``) and ``.code`` its
  ``error`` (``'Duplicate'``, ``'Bucket not found'``, ``'not_found'``, ``'Unauthorized'``);
* a real HTTP 5xx with a non-JSON body (gateway/proxy) -> ``StorageApiError`` with
  ``.code == 'InternalError'`` and ``.status`` the **int** HTTP status (``503``); with Storage's
  own JSON 5xx body the status is again the body's string (``'500'``). Compare ``str(exc.status)``;
* connection refused -> ``httpx.ConnectError``; no answer within the client timeout ->
  ``httpx.ReadTimeout``; connection closed without an answer -> ``httpx.RemoteProtocolError``
  (all ``httpx.TransportError``, never wrapped by storage3: it only catches ``HTTPStatusError``).

``acreate_client`` does no network I/O: the auth client only reads its (empty, in-memory) session
store, and realtime/postgrest/storage clients are built lazily without connecting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from storage3.exceptions import StorageApiError
from storage3.types import FileOptions
from supabase import AsyncClient, AsyncClientOptions, acreate_client, create_client

from fakes.storage_server import FakeStorage, running_storage_server, start_storage_server

KEY = "test-service-role-key"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
IMAGE: FileOptions = {"content-type": "image/png"}
IMAGE_UPSERT: FileOptions = {"content-type": "image/png", "upsert": "true"}

# supabase itself passes storage3's deprecated timeout/verify arguments; not our concern here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The '(timeout|verify)' parameter is deprecated:DeprecationWarning")


@pytest.fixture
def state() -> FakeStorage:
    state = FakeStorage(service_key=KEY)
    state.add_bucket("outputs", public=True)
    state.add_bucket("private")
    return state


@pytest.fixture
async def base_url(state: FakeStorage) -> AsyncIterator[str]:
    async with running_storage_server(state) as url:
        yield url


async def _client(base_url: str, key: str = KEY, timeout: float | None = None) -> AsyncClient:
    # A sub-second timeout needs our own httpx client: storage_client_timeout is int()-truncated.
    options = None
    if timeout:
        options = AsyncClientOptions(httpx_client=httpx.AsyncClient(timeout=timeout))
    return await acreate_client(base_url, key, options)


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[AsyncClient]:
    client = await _client(base_url)
    yield client
    await client.storage.session.aclose()


async def test_acreate_client_does_no_network_io(state: FakeStorage, base_url: str) -> None:
    client = await acreate_client(base_url, KEY)
    assert state.requests == []
    storage = client.storage  # built lazily, still no request
    await asyncio.sleep(0.05)  # give any background task a chance
    assert state.requests == []
    await storage.session.aclose()
    # Even an unreachable URL is fine at creation time.
    await acreate_client("http://127.0.0.1:9", KEY)


async def test_upload_then_download_roundtrip(state: FakeStorage, client: AsyncClient) -> None:
    bucket = client.storage.from_("outputs")
    res = await bucket.upload("jobs/42/out 1.png", PNG, IMAGE)
    assert res.full_path == "outputs/jobs/42/out 1.png"
    assert await bucket.download("jobs/42/out 1.png") == PNG

    stored = state.get("outputs", "jobs/42/out 1.png")
    assert stored is not None and stored.content_type == "image/png"
    assert stored.cache_control == "3600"
    [record] = state.uploads
    assert (record.method, record.size, record.upsert) == ("POST", len(PNG), False)
    assert record.status == 200
    assert record.content_type == "image/png"
    assert {k.lower() for k in record.headers}.isdisjoint({"apikey", "authorization"})
    assert record.headers["x-upsert"] == "false"


async def test_duplicate_without_upsert_is_409_and_upsert_replaces(
    state: FakeStorage, client: AsyncClient
) -> None:
    bucket = client.storage.from_("outputs")
    await bucket.upload("a.png", b"first", IMAGE)
    with pytest.raises(StorageApiError) as info:
        await bucket.upload("a.png", b"second", IMAGE)
    assert (info.value.status, info.value.code) == ("409", "Duplicate")
    assert await bucket.download("a.png") == b"first"

    await bucket.upload("a.png", b"third", {"content-type": "image/webp", "upsert": "true"})
    assert await bucket.download("a.png") == b"third"
    assert state.get("outputs", "a.png").content_type == "image/webp"  # type: ignore[union-attr]
    assert [(u.upsert, u.status, u.body_status) for u in state.uploads] == [
        (False, 200, None), (False, 400, "409"), (True, 200, None)]


async def test_public_url_serves_bytes_without_auth(client: AsyncClient, base_url: str) -> None:
    await client.storage.from_("outputs").upload("p.png", PNG, IMAGE)
    url = await client.storage.from_("outputs").get_public_url("p.png")
    assert url == f"{base_url}/storage/v1/object/public/outputs/p.png"
    async with httpx.AsyncClient() as http:
        resp = await http.get(url)
        assert resp.status_code == 200 and resp.content == PNG
        assert resp.headers["content-type"] == "image/png"
        assert resp.headers["cache-control"] == "max-age=3600"
        assert resp.headers["etag"].startswith('"')
        # A private bucket's object is hidden behind "not found", HTTP 400 as always.
        await client.storage.from_("private").upload("p.png", PNG, IMAGE)
        hidden = await http.get(await client.storage.from_("private").get_public_url("p.png"))
        assert hidden.status_code == 400 and hidden.json()["statusCode"] == "404"


async def test_signed_url_verifies_token_and_expiry(
    state: FakeStorage, client: AsyncClient
) -> None:
    bucket = client.storage.from_("private")
    await bucket.upload("s.png", PNG, IMAGE)
    url = (await bucket.create_signed_url("s.png", 60))["signedURL"]
    assert url is not None and "/storage/v1/object/sign/private/s.png?token=" in url
    async with httpx.AsyncClient() as http:
        ok = await http.get(url)
        assert ok.status_code == 200 and ok.content == PNG
        assert ok.headers["content-type"] == "image/png"

        tampered = await http.get(url[:-2] + ("AA" if not url.endswith("AA") else "BB"))
        assert tampered.status_code == 400 and tampered.json()["error"] == "InvalidJWT"
        other_path = await http.get(url.replace("/s.png?", "/t.png?"))
        assert other_path.status_code == 400

        real_clock = state.clock
        state.clock = lambda: real_clock() + 61
        expired = await http.get(url)
        assert expired.status_code == 400 and expired.json()["message"] == "jwt expired"

    with pytest.raises(StorageApiError) as info:
        await bucket.create_signed_url("missing.png", 60)
    assert (info.value.status, info.value.code) == ("404", "not_found")


async def test_wrong_key_is_403(state: FakeStorage, base_url: str) -> None:
    client = await _client(base_url, key="not-the-key")
    with pytest.raises(StorageApiError) as info:
        await client.storage.from_("outputs").upload("x.png", PNG, IMAGE)
    assert (info.value.status, info.value.code) == ("403", "Unauthorized")
    assert state.objects == {}
    await client.storage.session.aclose()


async def test_missing_bucket_and_object_are_404(client: AsyncClient) -> None:
    with pytest.raises(StorageApiError) as info:
        await client.storage.from_("nope").upload("x.png", PNG, IMAGE)
    assert (info.value.status, info.value.code) == ("404", "Bucket not found")
    with pytest.raises(StorageApiError) as info:
        await client.storage.from_("outputs").download("missing.png")
    assert (info.value.status, info.value.code) == ("404", "not_found")
    assert await client.storage.from_("outputs").exists("missing.png") is False


async def test_fail_next_gives_a_real_5xx_once(state: FakeStorage, client: AsyncClient) -> None:
    state.fail_next(1, status=503)
    bucket = client.storage.from_("outputs")
    with pytest.raises(StorageApiError) as info:
        await bucket.upload("r.png", PNG, IMAGE)
    # Plain-text 5xx: storage3 cannot parse it, so status is the int HTTP status.
    assert (info.value.status, info.value.code) == (503, "InternalError")
    await bucket.upload("r.png", PNG, IMAGE_UPSERT)
    assert [(u.status, u.upsert) for u in state.uploads] == [(503, False), (200, True)]
    assert state.upload_count == 2


async def test_fail_next_with_storage_json_body(state: FakeStorage, client: AsyncClient) -> None:
    state.fail_next(1, status=500, body={"statusCode": "500", "error": "internal", "message": "x"})
    with pytest.raises(StorageApiError) as info:
        await client.storage.from_("outputs").upload("r.png", PNG, IMAGE)
    assert (info.value.status, info.value.code) == ("500", "internal")


async def test_delay_uploads(state: FakeStorage, client: AsyncClient) -> None:
    state.delay_uploads = 0.3
    started = time.monotonic()
    await client.storage.from_("outputs").upload("d.png", PNG, IMAGE)
    assert time.monotonic() - started >= 0.3


async def test_hanging_upload_times_out_but_may_still_land(
    state: FakeStorage, base_url: str
) -> None:
    client = await _client(base_url, timeout=0.3)
    state.hang_uploads = True
    with pytest.raises(httpx.ReadTimeout):
        await client.storage.from_("outputs").upload("h.png", PNG, IMAGE)
    # The server finishes the request after the client gave up: a retry must use upsert.
    state.release()
    for _ in range(50):
        if state.get("outputs", "h.png") is not None:
            break
        await asyncio.sleep(0.01)
    assert state.get("outputs", "h.png") is not None
    await client.storage.from_("outputs").upload("h.png", PNG, IMAGE_UPSERT)
    await client.storage.session.aclose()


async def test_dropped_connection(state: FakeStorage, client: AsyncClient) -> None:
    state.drop_next(1)
    with pytest.raises(httpx.RemoteProtocolError):
        await client.storage.from_("outputs").upload("x.png", PNG, IMAGE)
    assert state.uploads[0].status is None and state.objects == {}
    await client.storage.from_("outputs").upload("x.png", PNG, IMAGE)


async def test_connection_refused_after_stop(state: FakeStorage) -> None:
    url, stop = await start_storage_server(state)
    client = await _client(url)
    await stop()
    with pytest.raises(httpx.ConnectError):
        await client.storage.from_("outputs").upload("x.png", PNG, IMAGE)
    await client.storage.session.aclose()


async def test_bucket_api_and_remove(state: FakeStorage, client: AsyncClient) -> None:
    storage = client.storage
    assert await storage.create_bucket("new", options={"public": True}) == {"name": "new"}
    with pytest.raises(StorageApiError) as info:
        await storage.create_bucket("new")
    assert info.value.status == "409"
    assert {b.id for b in await storage.list_buckets()} == {"outputs", "private", "new"}
    assert (await storage.get_bucket("new")).public is True
    with pytest.raises(StorageApiError) as info:
        await storage.get_bucket("nope")
    assert info.value.status == "404"
    assert await storage.update_bucket("new", {"public": False}) == {
        "message": "Successfully updated"}
    assert (await storage.get_bucket("new")).public is False
    with pytest.raises(StorageApiError) as info:
        await storage.update_bucket("nope", {"public": True})
    assert info.value.status == "404"

    await storage.from_("new").upload("a.png", PNG, IMAGE)
    removed = await storage.from_("new").remove(["a.png", "never.png"])
    assert [r["name"] for r in removed] == ["a.png"] and state.objects == {}


async def test_bucket_limits(state: FakeStorage, client: AsyncClient) -> None:
    state.add_bucket("strict", file_size_limit=10, allowed_mime_types=["image/png"])
    bucket = client.storage.from_("strict")
    with pytest.raises(StorageApiError) as info:
        await bucket.upload("a.png", PNG, IMAGE)
    assert (info.value.status, info.value.code) == ("413", "Payload too large")
    with pytest.raises(StorageApiError) as info:
        await bucket.upload("a.txt", b"tiny")  # client default: text/plain;charset=UTF-8
    assert (info.value.status, info.value.code) == ("415", "invalid_mime_type")


async def test_sync_client_works_too(state: FakeStorage, base_url: str) -> None:
    def run() -> bytes:
        client = create_client(base_url, KEY)
        bucket = client.storage.from_("outputs")
        try:
            bucket.upload("sync.png", PNG, IMAGE)
            assert bucket.get_public_url("sync.png").endswith("/object/public/outputs/sync.png")
            return bucket.download("sync.png")
        finally:
            client.storage.session.close()

    assert await asyncio.to_thread(run) == PNG
