"""A local callback receiver: what `python -m comfy_courier listen` runs.

It makes the checks a backend must make on every callback (the X-API-Key, then the
Standard Webhooks signature, with the same `standardwebhooks` library the courier signs
with) and prints what arrived, so a person can see the courier's callbacks and check a
configuration before writing the backend. Tests start it in-process with
`serve_listener()`. Importing this module starts nothing.
"""

from __future__ import annotations

import hmac
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from aiohttp import web
from standardwebhooks.webhooks import Webhook


@dataclass(frozen=True)
class Verdict:
    """What a receiver should conclude about one callback."""

    key: str  # ok | bad | missing | unchecked
    signature: str  # ok | bad | unsigned | unchecked
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.key in ("ok", "unchecked") and self.signature in ("ok", "unchecked")


def check_callback(
    headers: Mapping[str, str], body: bytes, keys: Sequence[str], verifiers: Sequence[Webhook]
) -> Verdict:
    """The checks a backend must make: the X-API-Key, then the Standard Webhooks signature.

    With no expected key (or no secret) that check is "unchecked", not passed silently as
    "ok"; with a secret set, an unsigned callback fails, as it would at a strict receiver.
    """
    given = headers.get("X-API-Key")
    if not keys:
        key = "unchecked"
    elif not given:
        key = "missing"
    else:
        matched = False
        for expected in keys:
            # aiohttp keeps header bytes that are not UTF-8 as surrogates: never raise on them
            matched |= hmac.compare_digest(
                given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
            )
        key = "ok" if matched else "bad"

    signed = bool(headers.get("webhook-signature"))
    if not verifiers:
        return Verdict(key, "unchecked", "signed, but no secret to check it" if signed else "")
    if not signed:
        return Verdict(key, "unsigned", "no webhook-signature header")
    plain = {name.lower(): value for name, value in headers.items()}
    reason = ""
    for verifier in verifiers:  # several secrets: a rotation in progress
        try:
            verifier.verify(body, plain, json_parse=False)
            return Verdict(key, "ok")
        except Exception as e:  # WebhookVerificationError, or a malformed header
            reason = str(e) or type(e).__name__
    return Verdict(key, "bad", reason)


def make_verifiers(secret_list: Sequence[str]) -> list[Webhook]:
    """One Standard Webhooks verifier per secret; a malformed secret is a ValueError."""
    verifiers = []
    for secret in secret_list:
        try:
            verifiers.append(Webhook(secret))
        except Exception as e:
            raise ValueError(f"invalid webhook secret (expected whsec_<base64>): {e}") from e
    return verifiers


@dataclass
class Delivery:
    """One request as received, with the verdict and the answer given."""

    method: str
    path: str
    webhook_id: str | None
    verdict: Verdict
    status: int
    body: Any
    repeat: bool


@dataclass
class Listener:
    """A running callback receiver; `received` keeps every delivery, newest last."""

    url: str
    port: int
    runner: web.AppRunner
    received: list[Delivery] = field(default_factory=list)

    async def close(self) -> None:
        await self.runner.cleanup()


def report(delivery: Delivery, out: TextIO) -> None:
    verdict = delivery.verdict
    signature = verdict.signature + (f" ({verdict.detail})" if verdict.detail else "")
    lines = [
        f"── {time.strftime('%H:%M:%S')}  {delivery.method} {delivery.path}",
        f"   webhook-id: {delivery.webhook_id or '(none)'}"
        + ("  (repeat: de-duplicate on this id)" if delivery.repeat else ""),
        f"   key:        {verdict.key}",
        f"   signature:  {signature}",
        f"   answered:   {delivery.status}",
    ]
    print("\n".join(lines), file=out, flush=True)
    text = (
        delivery.body
        if isinstance(delivery.body, str)
        else json.dumps(delivery.body, indent=2, ensure_ascii=False)
    )
    print(text, file=out, flush=True)


async def serve_listener(
    host: str = "127.0.0.1",
    port: int = 0,
    keys: Sequence[str] = (),
    secret_list: Sequence[str] = (),
    accept_bad: bool = False,
    out: TextIO = sys.stdout,
) -> Listener:
    """Start a callback receiver on host:port (0 picks a free port) and return at once.

    Every request, on any path and method, is printed and answered 200, or 401 when a
    check fails (unless `accept_bad`); the caller stops it with `await listener.close()`.
    """
    verifiers = make_verifiers(secret_list)
    seen: set[str] = set()
    received: list[Delivery] = []

    async def handle(request: web.Request) -> web.Response:
        raw = await request.read()
        verdict = check_callback(request.headers, raw, keys, verifiers)
        status = 200 if verdict.ok or accept_bad else 401
        webhook_id = request.headers.get("webhook-id")
        text = raw.decode("utf-8", errors="replace")
        try:
            body: Any = json.loads(text) if text else ""
        except ValueError:
            body = text
        delivery = Delivery(
            request.method,
            request.path_qs,
            webhook_id,
            verdict,
            status,
            body,
            repeat=webhook_id in seen,
        )
        if webhook_id and verdict.ok:
            seen.add(webhook_id)
        received.append(delivery)
        report(delivery, out)
        answer = {"ok": status == 200, "key": verdict.key, "signature": verdict.signature}
        return web.json_response(answer, status=status)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    return Listener(f"http://{shown}:{bound}/", bound, runner, received)
