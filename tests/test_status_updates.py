"""Intermediate status updates over aiohttp: what a receiver gets, and every way a send
fails counted, logged at DEBUG only, and never raised."""

from __future__ import annotations

import asyncio
import logging

from comfy_courier.executor.jobs import Job
from comfy_courier.executor.status_updates import StatusNotifier

from conftest import CALLBACK_KEY


def job(cid: str) -> Job:
    return Job(cid, 1, "p1", "i", "{}", "f", created_at=0.0)


async def settled(notifier: StatusNotifier, count: int) -> None:
    """Until `count` sends have ended (sent or failed)."""
    for _ in range(2000):
        if notifier.sent + notifier.failed >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{count} sends never ended: {notifier.sent}, {notifier.failed} failed")


async def test_an_update_is_signed_and_keyed(receiver):
    notifier = StatusNotifier(receiver.url, CALLBACK_KEY, ("whsec_" + "A" * 32,))
    try:
        notifier.update(job("su1"), "running", 0.25)
        [request] = await receiver.wait_for(1)
        await settled(notifier, 1)
    finally:
        await notifier.aclose()
    assert request.json["status"] == "running" and request.json["progress"] == 0.25
    assert request.headers["X-API-Key"] == CALLBACK_KEY
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["webhook-id"].startswith("msg_")
    assert request.headers["webhook-signature"].startswith("v1,")
    assert notifier.sent == 1 and notifier.failed == 0


async def test_refused_redirected_late_and_unreachable_updates_are_counted_not_raised(
        receiver, caplog):
    caplog.set_level(logging.DEBUG, logger="comfy_courier")
    receiver.script = [(500, {}, 0.0), (302, {"Location": "http://127.0.0.1:9/x"}, 0.0),
                       (200, {}, 1.0)]
    notifier = StatusNotifier(receiver.url, None, (), timeout=0.2)
    down = StatusNotifier("http://127.0.0.1:9/status", None, ())
    try:
        for i, cid in enumerate(("su2", "su3", "su4")):
            notifier.update(job(cid), "queued", None)
            await settled(notifier, i + 1)
        down.update(job("su5"), "queued", None)
        await settled(down, 1)
    finally:
        await notifier.aclose()
        await down.aclose()
    assert (notifier.sent, notifier.failed, down.sent, down.failed) == (0, 3, 0, 1)
    assert len(receiver.requests) == 3  # the redirect was not followed
    lines = [(r.levelno, r.getMessage()) for r in caplog.records
             if "status update" in r.getMessage()]
    assert [text.rsplit(": ", 1)[1] for _, text in lines[:3]] == [
        "HTTP 500", "HTTP 302", "no answer in time"]
    assert "ClientConnectorError" in lines[3][1]
    assert {level for level, _ in lines} == {logging.DEBUG}


async def test_an_unusable_url_is_a_failed_update(caplog):
    caplog.set_level(logging.DEBUG, logger="comfy_courier")
    notifier = StatusNotifier("http://[::1/status", None, ())
    try:
        notifier.update(job("su6"), "queued", None)
        await settled(notifier, 1)
    finally:
        await notifier.aclose()
    assert (notifier.sent, notifier.failed) == (0, 1)
