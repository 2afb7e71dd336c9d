"""Command-line helpers: `python custom_nodes/comfy-courier/cli.py COMMAND …` with ComfyUI's
Python, or `comfy-courier COMMAND …` / `python -m comfy_courier COMMAND …` after a pip install.

`submit` sends a workflow to a courier the way a web backend would (and can wait for the
result), so a person can try a ComfyUI host without writing the backend first. `listen`
is a local callback receiver that checks the key and Standard Webhooks signature exactly
as the backend should, so a person can see what the courier sends before writing it.
The operator's commands (`webhook-secret`, `bucket`, `redeliver`) live in admin.py.

Importing this module starts nothing and reads no environment: both happen in `main()`.
It needs no ComfyUI; `listen` (listener.py) needs aiohttp, always present beside ComfyUI
(elsewhere: the `listen` extra), and is imported only when it runs so `submit` works
without it. Run by its path, this file imports its own folder as the package (see the end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx

DEFAULT_URL = "http://127.0.0.1:8188"
FINAL_STATES = ("success", "error")
EXIT_OK, EXIT_JOB_ERROR, EXIT_REJECTED, EXIT_WAIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
REQUEST_TIMEOUT = 30.0
RETRYABLE_POLL_STATUSES = (502, 503, 504)  # a restarting ComfyUI or its proxy: keep waiting


class UsageError(Exception):
    """A problem with what the user asked for; reported as one line, exit code 2."""


# -- submit ----------------------------------------------------------------------------


def workflow_format(workflow: Any) -> str:
    """Whether `workflow` is "api", "ui" or "unknown": say so before the courier refuses it."""
    if not isinstance(workflow, dict) or not workflow:
        return "unknown"
    if isinstance(workflow.get("nodes"), list) and isinstance(workflow.get("links"), list):
        return "ui"
    if all(isinstance(node, dict) and "class_type" in node for node in workflow.values()):
        return "api"
    return "unknown"


def load_workflow(path: Path) -> tuple[Any, str | None]:
    """The workflow in `path`, and the id it names if the file is a whole request body.

    Accepting a saved request body (`{"workflow_json", "content_request_id"}`) lets a
    person replay exactly what their backend sent.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("workflow_json"), dict):
        cid = data.get("content_request_id")
        return data["workflow_json"], cid if isinstance(cid, str) else None
    return data, None


def new_request_id() -> str:
    """A readable, unique id that is a valid storage path (the courier's id rule)."""
    return f"cli-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def first_key(value: str | None) -> str | None:
    """The first of a comma-separated key list: COURIER_API_KEY may hold several (rotation)."""
    keys = [k.strip() for k in (value or "").split(",") if k.strip()]
    return keys[0] if keys else None


def api_key(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    """--key, else the first of COURIER_API_KEY; a usage error without either."""
    key: str | None = args.key or first_key(environ.get("COURIER_API_KEY"))
    if not key:
        raise UsageError("no API key: pass --key or set COURIER_API_KEY")
    return key


def endpoint(base_url: str, cid: str | None = None) -> str:
    url = base_url.rstrip("/") + "/execute-workflow"
    return f"{url}/{cid}" if cid else url


def describe(body: Any) -> str:
    """One line for a status body: what a person watching a job wants to see."""
    if not isinstance(body, dict):
        return str(body)
    state = body.get("state", "?")
    parts = [str(state)]
    if state == "queued" and body.get("queue_position") is not None:
        parts.append(f"(queue position {body['queue_position']})")
    if state == "running" and isinstance(body.get("progress"), (int, float)):
        parts.append(f"{body['progress']:.0%}")
    if state == "success":
        parts.append(" ".join(body.get("image_urls") or []) or str(body.get("image_url")))
    if state == "error":
        parts.append(f"[{body.get('error_type') or 'error'}] {body.get('error_message')}")
    return " ".join(parts)


def print_json(body: Any, out: TextIO) -> None:
    print(json.dumps(body, indent=2, ensure_ascii=False), file=out, flush=True)


def response_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


async def run_submit(
    args: argparse.Namespace,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    environ: Mapping[str, str] = os.environ,
) -> int:
    """POST the workflow; with --wait, poll until it is final. Returns the exit code."""
    from .executor.intake import ID_PATTERN

    key = api_key(args, environ)
    workflow, file_id = load_workflow(Path(args.workflow))
    cid = args.id or file_id or new_request_id()
    if not ID_PATTERN.fullmatch(cid):
        raise UsageError(f"--id {cid!r}: use 1-128 of A-Z a-z 0-9 _ - (it becomes a storage path)")
    kind = workflow_format(workflow)
    if kind == "ui":
        print(
            f"warning: {args.workflow} is a UI-format workflow (it has 'nodes' and 'links'); "
            "the courier runs API format only: in ComfyUI use Workflow > Export (API). "
            "Sending it anyway.",
            file=err,
            flush=True,
        )
    elif kind == "unknown":
        print(
            f"warning: {args.workflow} does not look like an API-format workflow "
            "({node_id: {class_type, inputs}}). Sending it anyway.",
            file=err,
            flush=True,
        )

    async with httpx.AsyncClient(
        timeout=REQUEST_TIMEOUT, headers={"X-API-Key": key}, follow_redirects=False
    ) as client:
        url = endpoint(args.url)
        print(f"POST {url}  content_request_id={cid}", file=err, flush=True)
        try:
            response = await client.post(
                url, json={"workflow_json": workflow, "content_request_id": cid}
            )
        except httpx.HTTPError as e:
            print(f"error: cannot reach {url}: {e!r}", file=err, flush=True)
            return EXIT_REJECTED
        body = response_body(response)
        print(f"HTTP {response.status_code} {response.reason_phrase}", file=err, flush=True)
        print_json(body, out)
        if response.status_code not in (200, 202):
            return EXIT_REJECTED
        if not args.wait:
            return EXIT_OK
        return await wait_final(client, args.url, cid, body, args.timeout, args.interval, out, err)


async def wait_final(
    client: httpx.AsyncClient,
    base_url: str,
    cid: str,
    body: Any,
    timeout: float,
    interval: float,
    out: TextIO,
    err: TextIO,
) -> int:
    """Poll the status route until the job is final; a restarting host is waited for."""
    deadline = time.monotonic() + timeout
    url = endpoint(base_url, cid)
    last = ""
    polled = False  # the POST's answer is printed already
    while True:
        if isinstance(body, dict) and body.get("state") in FINAL_STATES:
            if polled:
                print_json(body, out)
            print(f"final: {describe(body)}", file=err, flush=True)
            return EXIT_OK if body["state"] == "success" else EXIT_JOB_ERROR
        line = describe(body)
        if line != last:
            print(f"  {line}", file=err, flush=True)
            last = line
        if time.monotonic() >= deadline:
            print(f"gave up after {timeout:g} s; the job goes on: GET {url}", file=err, flush=True)
            return EXIT_WAIT_TIMEOUT
        await asyncio.sleep(interval)
        try:
            response = await client.get(url)
        except httpx.HTTPError as e:
            last = f"cannot reach the courier ({type(e).__name__}); still waiting"
            print(f"  {last}", file=err, flush=True)
            continue
        if response.status_code in RETRYABLE_POLL_STATUSES:
            continue
        if response.status_code != 200:
            print(f"GET {url}: HTTP {response.status_code}", file=err, flush=True)
            print_json(response_body(response), out)
            return EXIT_REJECTED
        body = response_body(response)
        polled = True


def split_list(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


async def run_listen(
    args: argparse.Namespace,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    environ: Mapping[str, str] = os.environ,
) -> int:
    """Serve until cancelled (Ctrl-C)."""
    try:
        from .listener import serve_listener  # aiohttp: only this command needs it
    except ImportError as e:
        raise UsageError(
            f"listen needs aiohttp ({e}): run it with ComfyUI's Python, which has it, or "
            "install comfy-courier with its extra: pip install 'comfy-courier[listen]'"
        ) from e

    keys = split_list(args.key if args.key is not None else environ.get("COURIER_CALLBACK_API_KEY"))
    secret_list = split_list(
        args.secret if args.secret is not None else environ.get("COURIER_WEBHOOK_SECRET")
    )
    try:
        listener = await serve_listener(
            args.host, args.port, keys, secret_list, args.accept_bad, out
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    checks = [
        f"key {'checked' if keys else 'not checked'}",
        f"signature {'checked' if secret_list else 'not checked'}",
    ]
    print(f"listening on {listener.url} ({', '.join(checks)}); Ctrl-C stops", file=err, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await listener.close()
    return EXIT_OK


# -- entry point -----------------------------------------------------------------------


def program_name(argv0: str | None = None) -> str:
    """How the user ran us, for usage lines: the path to cli.py, -m, or the installed script."""
    argv0 = argv0 if argv0 is not None else (sys.argv[0] if sys.argv else "")
    if argv0.endswith("__main__.py"):
        return "python -m comfy_courier"
    if argv0.endswith(".py"):
        return f"python {argv0}"
    return Path(argv0).name or "comfy-courier"


def build_parser() -> argparse.ArgumentParser:
    from . import admin

    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="Helpers for comfy-courier: submit a workflow, receive callbacks locally, "
        "make a webhook secret, set up the Supabase bucket, redeliver dead callbacks.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser(
        "submit",
        help="POST an API-format workflow to /execute-workflow",
        description="POST an API-format workflow to a courier. Exit codes: 0 accepted (or "
        "success with --wait), 1 the job ended in error, 2 rejected or "
        "unreachable, 3 --timeout passed while waiting.",
    )
    submit.set_defaults(run=run_submit)
    submit.add_argument(
        "workflow",
        metavar="WORKFLOW.json",
        help="API-format workflow (Workflow > Export (API)), or a saved "
        "request body {workflow_json, content_request_id}",
    )
    submit.add_argument("--url", default=DEFAULT_URL, help=f"ComfyUI base URL ({DEFAULT_URL})")
    submit.add_argument("--key", help="X-API-Key (default: first of $COURIER_API_KEY)")
    submit.add_argument("--id", help="content_request_id (default: generated, cli-…)")
    submit.add_argument("--wait", action="store_true", help="poll until success or error")
    submit.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait with --wait (600)"
    )
    submit.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)

    listen = commands.add_parser(
        "listen",
        help="receive callbacks locally and check their key and signature",
        description="A local callback receiver: point COURIER_CALLBACK_URL at it. It prints "
        "each request and answers 200, or 401 when a check fails.",
    )
    listen.set_defaults(run=run_listen)
    listen.add_argument("--port", type=int, required=True, help="port to listen on")
    listen.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    listen.add_argument(
        "--key",
        help="expected X-API-Key, comma-separated for several (default: $COURIER_CALLBACK_API_KEY)",
    )
    listen.add_argument(
        "--secret", help="whsec_… secret(s), comma-separated (default: $COURIER_WEBHOOK_SECRET)"
    )
    listen.add_argument(
        "--accept-bad", action="store_true", help="answer 200 even when a check fails"
    )
    admin.add_commands(commands, DEFAULT_URL)
    openapi = commands.add_parser(
        "openapi",
        help="print the OpenAPI 3.1 document of the routes and callbacks",
        description="Print the OpenAPI 3.1 document that GET /courier/openapi.json serves "
        "(for code generators; clients/typescript/openapi.json is this output).",
    )
    openapi.set_defaults(run=run_openapi)
    return parser


async def run_openapi(args: argparse.Namespace) -> int:
    from .openapi import document

    print(json.dumps(document(), indent=2))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(asyncio.run(args.run(args)))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REJECTED
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "listen" else EXIT_INTERRUPTED


def _main_from_folder() -> int:
    """`python <ComfyUI>/custom_nodes/comfy-courier/cli.py …`: ComfyUI's Python, no install.

    This folder is the package, but its name (`comfy-courier`, or whatever the clone is
    called) is no module name, and nothing installed it as `comfy_courier`. Register the
    folder under that name, without running its __init__ (which registers ComfyUI nodes;
    journal_child.py imports the journal the same way), then run this file as part of it
    so its relative imports work. An installed comfy_courier elsewhere is not used.
    """
    import importlib
    import types

    package = types.ModuleType("comfy_courier")
    package.__path__ = [str(Path(__file__).resolve().parent)]
    sys.modules["comfy_courier"] = package
    return int(importlib.import_module("comfy_courier.cli").main())


if __name__ == "__main__":
    sys.exit(main() if __package__ else _main_from_folder())
