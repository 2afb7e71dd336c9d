"""Wires comfy-courier into a running ComfyUI: settings, adapter, storage, routes, start-up.

`setup()` does no I/O and starts no thread: it registers the routes and schedules
`Courier.start()` on ComfyUI's server loop, which runs once ComfyUI starts serving.
It never raises: a missing setting or an unsupported ComfyUI is logged, and ComfyUI
carries on without the courier.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

from .executor.comfy_adapter import ComfyAdapter
from .executor.courier import Courier
from .executor.delivery import DEFAULT_SCHEDULE, Deliverer
from .executor.errors import NotConfigured, UnsupportedComfyUI
from .executor.settings import Settings
from .executor.status_updates import StatusNotifier
from .executor.storage import Storage
from .executor.storage.local import LocalStorage
from .executor.store import Store
from .executor.store.sqlite import open_sqlite

log = logging.getLogger("comfy_courier")


@dataclass
class Runtime:
    settings: Settings
    adapter: ComfyAdapter
    courier: Courier
    loop: asyncio.AbstractEventLoop


_runtime: Runtime | None = None


def current_runtime() -> Runtime | None:
    return _runtime


def build_storage(settings: Settings, adapter: Any) -> Storage:
    if settings.storage == "supabase" and settings.supabase_url and settings.supabase_key:
        from .executor.storage.supabase_storage import SupabaseStorage

        return SupabaseStorage(
            settings.supabase_url,
            settings.supabase_key,
            settings.bucket,
            settings.url_mode,
            settings.signed_url_ttl,
        )
    base = settings.public_base_url
    return LocalStorage(adapter.output_directory(), lambda: base or adapter.base_url())


def build_store(settings: Settings, adapter: Any, journal_thread: bool = False) -> Store:
    """PostgreSQL for `COURIER_DB=postgresql://…` (several hosts), else the SQLite journal."""
    if settings.db_url is not None:
        from .executor.store.postgres import open_postgres

        return open_postgres(settings.db_url, settings.db_schema)
    path = settings.db_path or adapter.user_directory() / "courier" / "courier.sqlite3"
    return open_sqlite(path, on_thread=journal_thread)


def build_courier(
    settings: Settings,
    adapter: Any,
    *,
    schedule: tuple[float, ...] = DEFAULT_SCHEDULE,
    delivery_timeout: float = 10.0,
    jitter: float = 0.1,
    upload_schedule: tuple[float, ...] = (0.5, 2.0, 8.0),
    journal_thread: bool = False,
) -> Courier:
    """Everything the courier needs, from settings; shared by ComfyUI start-up and tests.

    `journal_thread` runs the journal on a thread of this process, where a test can patch
    `Journal`'s methods; otherwise it runs in a child process (store/sqlite/process.py).
    """
    store = build_store(settings, adapter, journal_thread)
    instance = settings.instance or adapter.instance_name()
    deliverer = None
    if settings.callback_url:
        deliverer = Deliverer(
            store,
            instance,
            settings.callback_url,
            settings.callback_api_key,
            settings.webhook_secrets,
            schedule=schedule,
            horizon=settings.retry_horizon,
            timeout=delivery_timeout,
            jitter=jitter,
        )
    status = None
    if settings.status_url:
        status = StatusNotifier(
            settings.status_url,
            settings.callback_api_key,
            settings.webhook_secrets,
            interval=settings.progress_interval,
        )
    courier = Courier(
        settings,
        adapter,
        store,
        build_storage(settings, adapter),
        instance,
        deliverer,
        status=status,
        upload_schedule=upload_schedule,
    )
    store.on_lost = courier.journal_lost
    store.on_failure = courier.store_failed
    return courier


def setup() -> None:
    global _runtime
    try:
        settings = Settings.from_env(os.environ)
        for problem in settings.problems:
            log.warning("[courier] config: %s", problem)
        adapter = ComfyAdapter.from_comfyui()
        if (
            settings.storage == "local"
            and not settings.public_base_url
            and adapter.listens_beyond_loopback()
        ):
            log.warning(
                "[courier] config: ComfyUI listens beyond loopback; set "
                "COURIER_PUBLIC_BASE_URL so local-storage URLs point somewhere "
                "clients can reach (using %s meanwhile)",
                adapter.base_url(),
            )
        loop = adapter.loop
        courier = build_courier(settings, adapter)
        _runtime = Runtime(settings, adapter, courier, loop)
        from .routes import add_routes

        add_routes(adapter.routes, lambda: _runtime.courier if _runtime else None, settings)
        adapter.on_server_start(lambda: _start(courier))
        log.info(
            "[courier] comfy-courier loaded (ComfyUI %s, storage %s, instance %s)",
            adapter.version or "unknown",
            courier.storage.kind,
            courier.instance,
        )
    except (UnsupportedComfyUI, NotConfigured) as e:
        log.error("[courier] disabled: %s", e)
    except Exception:
        log.exception("[courier] disabled: set-up failed")


STORAGE_CHECK_TIMEOUT = 30.0


async def check_storage(courier: Courier) -> list[str]:
    """Check the storage backend once at start-up; its problems are config problems.

    A missing Supabase bucket, a refused key, or a bucket whose visibility does not match
    COURIER_URL_MODE (a private bucket in public mode turns every job into a `success`
    whose URL answers 400) is logged as a `[courier] config:` line and counted in
    /courier/health's `config_problems`. Jobs are still accepted: the log says what to fix.
    """
    check = getattr(courier.storage, "check", None)
    if check is None:
        return []
    try:
        problems: list[str] = await asyncio.wait_for(check(), STORAGE_CHECK_TIMEOUT)
    except asyncio.TimeoutError:
        problems = [f"storage check: no answer within {STORAGE_CHECK_TIMEOUT:g} s"]
    except Exception as e:
        log.exception("[courier] storage check failed")
        problems = [f"storage check failed: {e!r}"]
    for problem in problems:
        log.warning("[courier] config: %s", problem)
    courier.config_problems.extend(problems)
    return problems


def _start(courier: Courier) -> None:
    def report(done: asyncio.Task[Any]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.error("[courier] start-up failed", exc_info=done.exception())

    for start in (courier.start(), check_storage(courier)):
        asyncio.ensure_future(start).add_done_callback(report)
