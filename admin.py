"""The operator's command-line helpers: `webhook-secret`, `bucket`, `redeliver` (see cli.py).

- `webhook-secret` prints a new Standard Webhooks secret for COURIER_WEBHOOK_SECRET.
- `bucket check|create` checks, or creates and fixes, the Supabase bucket with the
  visibility COURIER_URL_MODE needs, from the same variables ComfyUI runs with.
- `redeliver` asks a courier to send dead-lettered callbacks again (one id, or every one
  dead since a time) once the receiver is fixed: POST /courier/redeliver.

Importing this module starts nothing and reads no environment.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import secrets
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import httpx

from .cli import (
    EXIT_OK,
    EXIT_REJECTED,
    REQUEST_TIMEOUT,
    UsageError,
    api_key,
    print_json,
    response_body,
)

EXIT_PROBLEMS = 1  # `bucket check` found something to fix
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_commands(commands: Any, default_url: str) -> None:
    """Add the operator's subcommands to cli.py's parser."""
    secret = commands.add_parser(
        "webhook-secret",
        help="print a new webhook secret for COURIER_WEBHOOK_SECRET",
        description="Print a new Standard Webhooks secret: whsec_ and the base64 of 32 random "
        "bytes. Give the same value to ComfyUI (COURIER_WEBHOOK_SECRET) and to your receiver.",
    )
    secret.set_defaults(run=run_webhook_secret)

    bucket = commands.add_parser(
        "bucket",
        help="check or create the Supabase Storage bucket",
        description="Check, or create, the bucket COURIER_BUCKET in the Supabase project of "
        "SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY, public for COURIER_URL_MODE=public "
        "and private for signed: run it with the environment ComfyUI runs with. Exit codes: "
        "0 fine, 1 (check) something to fix, 2 failed.",
    )
    bucket.set_defaults(run=run_bucket)
    bucket.add_argument(
        "action",
        choices=("check", "create"),
        help="check: report problems; create: create it, or set its visibility",
    )

    redeliver = commands.add_parser(
        "redeliver",
        help="send dead-lettered callbacks again (after fixing the receiver)",
        description="Ask a courier to send dead-lettered callbacks again, under their "
        "original webhook-id: one job's, or every one dead since a time. Exit codes: 0 "
        "done, 2 rejected or unreachable.",
    )
    redeliver.set_defaults(run=run_redeliver)
    which = redeliver.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", help="the job's content_request_id")
    which.add_argument(
        "--since",
        help="every callback dead-lettered since then: an ISO 8601 time (UTC unless it "
        "says), unix seconds, or a duration ago such as 90m, 6h or 2d",
    )
    redeliver.add_argument("--url", default=default_url, help=f"ComfyUI base URL ({default_url})")
    redeliver.add_argument("--key", help="X-API-Key (default: first of $COURIER_API_KEY)")


# -- webhook-secret --------------------------------------------------------------------


def new_webhook_secret() -> str:
    """`whsec_` and the base64 of 32 random bytes, as Standard Webhooks libraries expect."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def run_webhook_secret(
    args: argparse.Namespace,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    environ: Mapping[str, str] = os.environ,
) -> int:
    print(new_webhook_secret(), file=out, flush=True)
    return EXIT_OK


# -- bucket ----------------------------------------------------------------------------


async def run_bucket(
    args: argparse.Namespace,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    environ: Mapping[str, str] = os.environ,
) -> int:
    from .executor.errors import StorageError
    from .executor.settings import Settings
    from .executor.storage.supabase_storage import SupabaseStorage

    settings = Settings.from_env(environ)
    if settings.storage != "supabase" or not settings.supabase_url or not settings.supabase_key:
        raise UsageError(
            "set SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY (and COURIER_BUCKET, "
            "COURIER_URL_MODE if you changed them) as ComfyUI has them"
        )
    storage = SupabaseStorage(
        settings.supabase_url, settings.supabase_key, settings.bucket, settings.url_mode
    )
    where = (
        f"bucket {settings.bucket!r} at {settings.supabase_url} "
        f"(COURIER_URL_MODE={settings.url_mode})"
    )
    try:
        if args.action == "create":
            try:
                done = await storage.ensure_bucket()
            except StorageError as e:
                print(f"error: {where}: {e.message}", file=err, flush=True)
                return EXIT_REJECTED
            print(f"{done} ({where})", file=out, flush=True)
        problems = await storage.check()
    finally:
        await storage.aclose()
    for problem in problems:
        print(f"problem: {problem}", file=out, flush=True)
    if not problems:
        print(f"ok: {where}", file=out, flush=True)
    if args.action == "create" and problems:
        return EXIT_REJECTED
    return EXIT_PROBLEMS if problems else EXIT_OK


# -- redeliver -------------------------------------------------------------------------


def since_value(text: str, now: float) -> float | str:
    """What `--since` means for the route: unix seconds, or the ISO 8601 text as given."""
    text = text.strip()
    duration = _DURATION.match(text)
    if duration:
        return now - float(duration.group(1)) * _SECONDS[duration.group(2)]
    try:
        return float(text)
    except ValueError:
        return text  # the route reads ISO 8601 and says so if it cannot


async def run_redeliver(
    args: argparse.Namespace,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    environ: Mapping[str, str] = os.environ,
) -> int:
    key = api_key(args, environ)
    body: dict[str, Any] = (
        {"content_request_id": args.id}
        if args.id is not None
        else {"since": since_value(args.since, time.time())}
    )
    url = args.url.rstrip("/") + "/courier/redeliver"
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, follow_redirects=False) as client:
        try:
            response = await client.post(url, json=body, headers={"X-API-Key": key})
        except httpx.HTTPError as e:
            print(f"error: cannot reach {url}: {e!r}", file=err, flush=True)
            return EXIT_REJECTED
    answer = response_body(response)
    print(f"POST {url}: HTTP {response.status_code} {response.reason_phrase}", file=err)
    print_json(answer, out)
    if response.status_code != 200:
        return EXIT_REJECTED
    count = answer.get("redelivered", 0) if isinstance(answer, dict) else 0
    print(f"{count} dead callback(s) queued for delivery", file=err, flush=True)
    return EXIT_OK
