"""The environment's proxies, read once: uploads and callbacks go through them as httpx's
requests did, NO_PROXY hosts directly, and nothing is looked up per request."""

from __future__ import annotations

import asyncio

import pytest

from comfy_courier.executor.delivery import Deliverer
from comfy_courier.executor.jobs import Job
from comfy_courier.executor.proxies import Proxies
from comfy_courier.executor.status_updates import StatusNotifier

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture
def proxy_env(monkeypatch):
    """A clean proxy environment; returns the setter."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch.setenv


def test_no_proxy_configured_means_direct(proxy_env):
    assert Proxies().for_url("https://abc.supabase.co/storage/v1/object/b/k") is None


def test_scheme_proxies_all_proxy_and_no_proxy(proxy_env):
    proxy_env("HTTPS_PROXY", "http://proxy.internal:3128")
    proxy_env("ALL_PROXY", "http://fallback.internal:3128")
    proxy_env("NO_PROXY", "localhost,.svc.cluster.local")
    proxies = Proxies()
    assert proxies.for_url("https://abc.supabase.co/x") == "http://proxy.internal:3128"
    assert proxies.for_url("http://app.example/cb") == "http://fallback.internal:3128"
    assert proxies.for_url("http://localhost:3000/cb") is None
    assert proxies.for_url("http://web.default.svc.cluster.local/cb") is None


def test_the_environment_is_read_when_made_not_per_request(proxy_env):
    proxies = Proxies()
    proxy_env("HTTP_PROXY", "http://later.internal:3128")
    assert proxies.for_url("http://app.example/cb") is None


async def start_proxy(seen: list[str]) -> asyncio.Server:
    """A forward proxy on loopback that answers 200 itself, noting each request line."""

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n", 1)[0].decode())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(proxy, "127.0.0.1", 0)


async def test_a_callback_goes_through_the_environments_proxy(proxy_env, outbox):
    seen: list[str] = []
    server = await start_proxy(seen)
    proxy_env("HTTP_PROXY", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    deliverer = Deliverer(outbox, "i", "http://app.example.invalid/api/cb", None, ())
    try:
        assert await deliverer.dispatch_due() == 1
        await deliverer.drain()
    finally:
        await deliverer.close()
        server.close()
        await server.wait_closed()
    assert seen == ["POST http://app.example.invalid/api/cb HTTP/1.1"]
    assert (await outbox.callback_summary("d1", 1)).state == "delivered"


async def test_a_no_proxy_receiver_is_called_directly(proxy_env, outbox, receiver):
    proxy_env("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens: a proxied call would fail
    proxy_env("NO_PROXY", "127.0.0.1")
    deliverer = Deliverer(outbox, "i", receiver.url, None, ())
    try:
        await deliverer.dispatch_due()
        await deliverer.drain()
    finally:
        await deliverer.close()
    assert len(receiver.requests) == 1
    assert (await outbox.callback_summary("d1", 1)).state == "delivered"


async def test_a_status_update_goes_through_the_environments_proxy_read_once(proxy_env):
    seen: list[str] = []
    server = await start_proxy(seen)
    proxy_env("HTTP_PROXY", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    notifier = StatusNotifier("http://app.example.invalid/api/status", None, ())
    job = Job("p2", 1, "pp2", "i", "{}", "f", created_at=0.0)
    try:
        notifier.update(job, "queued", None)
        for _ in range(2000):
            if notifier.sent:
                break
            await asyncio.sleep(0.005)
        proxy_env("HTTP_PROXY", "http://127.0.0.1:9")  # read once: a later change is not seen
        notifier.update(job, "running", 0.5)
        for _ in range(2000):
            if notifier.sent + notifier.failed == 2:
                break
            await asyncio.sleep(0.005)
    finally:
        await notifier.aclose()
        server.close()
        await server.wait_closed()
    assert seen == ["POST http://app.example.invalid/api/status HTTP/1.1"] * 2
    assert (notifier.sent, notifier.failed) == (2, 0)
