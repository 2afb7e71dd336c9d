"""The httpx transport over aiohttp under the `supabase` client: what httpx's own transport
did, it does (bodies, headers, timeouts, redirects left to httpx, errors as httpx errors)."""

from __future__ import annotations

import asyncio
import gzip
import socket

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from comfy_courier.executor.errors import StorageError
from comfy_courier.executor.storage.aiohttp_transport import AiohttpTransport
from comfy_courier.executor.storage.supabase_storage import SupabaseStorage

from conftest import SERVICE_KEY, model_free


async def serve(routes: web.RouteTableDef) -> TestServer:
    app = web.Application()
    app.add_routes(routes)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def client(timeout: float = 5.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=AiohttpTransport(), timeout=timeout, follow_redirects=True)


async def test_a_multipart_upload_arrives_as_httpx_sent_it():
    seen: dict[str, object] = {}
    routes = web.RouteTableDef()

    @routes.post("/object/{path:.*}")
    async def upload(request: web.Request) -> web.Response:
        seen["path"] = request.match_info["path"]
        seen["query"] = dict(request.query)
        seen["headers"] = request.headers.copy()
        seen["length"] = request.content_length
        form = await request.post()
        seen["file"] = form["file"].file.read()  # type: ignore[union-attr]
        seen["filename"] = form["file"].filename  # type: ignore[union-attr]
        return web.json_response({"Key": "bucket/a/1-1.jpg"}, headers={"X-Answer": "yes"})

    server = await serve(routes)
    try:
        async with client() as http:
            answer = await http.post(
                str(server.make_url("/object/a/1-1.jpg")),
                params={"v": "1"},
                headers={"Authorization": "Bearer k", "x-upsert": "true"},
                files={"file": ("1-1.jpg", b"\xff\xd8jpeg-bytes", "image/jpeg")},
                data={"cacheControl": "3600"},
            )
    finally:
        await server.close()
    assert answer.status_code == 200 and answer.json() == {"Key": "bucket/a/1-1.jpg"}
    assert answer.headers["x-answer"] == "yes"
    assert seen["path"] == "a/1-1.jpg" and seen["query"] == {"v": "1"}
    assert seen["file"] == b"\xff\xd8jpeg-bytes" and seen["filename"] == "1-1.jpg"
    headers = seen["headers"]
    assert headers["Authorization"] == "Bearer k" and headers["x-upsert"] == "true"  # type: ignore[index]
    assert headers.getall("Content-Length") == [str(seen["length"])]  # type: ignore[attr-defined]
    assert headers["User-Agent"].startswith("python-httpx/")  # type: ignore[index]


async def test_a_compressed_answer_is_decoded_once():
    routes = web.RouteTableDef()

    @routes.get("/z")
    async def zipped(request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(b'{"ok": true}'),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    server = await serve(routes)
    try:
        async with client() as http:
            answer = await http.get(str(server.make_url("/z")))
    finally:
        await server.close()
    assert answer.json() == {"ok": True}


async def test_redirects_are_left_to_httpx():
    routes = web.RouteTableDef()

    @routes.get("/old")
    async def old(request: web.Request) -> web.Response:
        raise web.HTTPFound("/new")

    @routes.get("/new")
    async def new(request: web.Request) -> web.Response:
        return web.Response(text="here")

    server = await serve(routes)
    try:
        async with httpx.AsyncClient(transport=AiohttpTransport()) as http:  # no following
            first = await http.get(str(server.make_url("/old")))
        async with client() as http:
            followed = await http.get(str(server.make_url("/old")))
    finally:
        await server.close()
    assert first.status_code == 302 and first.headers["location"] == "/new"
    assert followed.status_code == 200 and followed.text == "here"
    assert [r.status_code for r in followed.history] == [302]


async def test_an_answer_later_than_the_read_timeout_is_a_read_timeout():
    routes = web.RouteTableDef()

    @routes.get("/slow")
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    server = await serve(routes)
    try:
        async with client(timeout=0.2) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.get(str(server.make_url("/slow")))
    finally:
        await server.close()


async def test_a_refused_connection_is_a_connect_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once it closes
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")


async def test_a_connection_closed_without_an_answer_is_a_network_error():
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with client() as http:
            with pytest.raises(httpx.NetworkError):
                await http.get(f"http://127.0.0.1:{port}/")
    finally:
        server.close()
        await server.wait_closed()


async def test_closing_the_client_closes_its_session():
    transport = AiohttpTransport()
    routes = web.RouteTableDef()

    @routes.get("/")
    async def root(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    server = await serve(routes)
    try:
        async with httpx.AsyncClient(transport=transport) as http:
            assert (await http.get(str(server.make_url("/")))).text == "ok"
            session = transport._session
            assert session is not None and not session.closed
        assert session.closed
    finally:
        await server.close()


async def test_supabase_storage_uploads_through_it(storage_server):
    storage = SupabaseStorage(storage_server.url, SERVICE_KEY, "comfy-outputs")
    try:
        url = await storage.put("t1/1-1.jpg", b"\xff\xd8jpeg", "image/jpeg")
        assert isinstance(storage._http._transport, AiohttpTransport)  # type: ignore[union-attr]
    finally:
        await storage.aclose()
    assert url.endswith("/object/public/comfy-outputs/t1/1-1.jpg")
    stored = storage_server.state.get("comfy-outputs", "t1/1-1.jpg")
    assert stored is not None and stored.data == b"\xff\xd8jpeg"


async def test_a_storage_timeout_through_it_is_a_retryable_storage_error(storage_server):
    storage_server.state.hang_uploads = True
    storage = SupabaseStorage(storage_server.url, SERVICE_KEY, "comfy-outputs", timeout=0.2)
    try:
        with pytest.raises(StorageError) as caught:
            await storage.put("t2/1-1.jpg", b"\xff\xd8jpeg", "image/jpeg")
    finally:
        storage_server.state.release()
        await storage.aclose()
    assert caught.value.retryable


async def test_stopping_the_courier_closes_the_storage_connections(make_harness, storage_server):
    h = await make_harness(
        env={"SUPABASE_URL": storage_server.url, "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY}
    )
    await h.post(model_free(), "close1")
    assert (await h.wait_final("close1"))["state"] == "success"
    transport = h.courier.storage._http._transport
    assert isinstance(transport, AiohttpTransport)
    session = transport._session
    assert session is not None and not session.closed
    await h.courier.stop()
    assert session.closed


async def proxy_server(seen: list[str]) -> tuple[asyncio.Server, int]:
    """A forward proxy that answers every request itself and notes its request line."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n", 1)[0].decode())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nvia proxy")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_the_environments_proxy_is_used_as_httpx_would(monkeypatch):
    seen: list[str] = []
    proxy, port = await proxy_server(seen)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    try:
        async with client() as http:  # the transport reads the environment when it is made
            answer = await http.get("http://storage.example.invalid/object/x")
    finally:
        proxy.close()
        await proxy.wait_closed()
    assert answer.text == "via proxy"
    assert seen == ["GET http://storage.example.invalid/object/x HTTP/1.1"]


async def test_no_proxy_hosts_are_reached_directly(monkeypatch):
    seen: list[str] = []
    proxy, port = await proxy_server(seen)
    routes = web.RouteTableDef()

    @routes.get("/direct")
    async def direct(request: web.Request) -> web.Response:
        return web.Response(text="direct")

    server = await serve(routes)
    for name in ("no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    try:
        async with client() as http:
            answer = await http.get(str(server.make_url("/direct")))
    finally:
        proxy.close()
        await proxy.wait_closed()
        await server.close()
    assert answer.text == "direct" and seen == []
