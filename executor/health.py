"""/courier/health and /courier/metrics: what an operator or a load balancer reads."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .claims import Claimer
from .comfy_port import ComfyPort
from .delivery import Deliverer
from .errors import StoreError
from .metrics import Metrics
from .runs import Runs
from .settings import Settings
from .storage import Storage
from .store import Fleet, Store


class Health:
    def __init__(
        self,
        settings: Settings,
        comfy: ComfyPort,
        store: Store,
        storage: Storage,
        runs: Runs,
        metrics: Metrics,
        deliverer: Deliverer | None,
    ) -> None:
        self.settings = settings
        self.comfy = comfy
        self.store = store
        self.storage = storage
        self.runs = runs
        self.metrics = metrics
        self.deliverer = deliverer
        self.fleet: Fleet | None = None  # a store shared by several hosts
        self.claims: Claimer | None = None
        self.clock: Callable[[], float] = time.time

    async def _fleet(self) -> tuple[int, int]:
        """(live hosts, waiting jobs) of the fleet sharing the store."""
        assert self.fleet is not None
        live = await self.fleet.live_hosts(self.clock(), self.settings.takeover_after)
        return live, await self.fleet.count_waiting()

    async def metrics_text(self) -> bytes:
        snapshot = self.comfy.queue_snapshot()
        pending, dead = await self.store.outbox_backlog()
        values: dict[str, float] = {
            "courier_unfinished_jobs": len(self.runs),
            "courier_comfy_queue_pending": len(snapshot.numbers),
            "courier_comfy_queue_running": snapshot.busy,
            "courier_outbox_pending": pending,
            "courier_outbox_dead": dead,
        }
        if self.fleet is not None:
            live, waiting = await self._fleet()
            values["courier_fleet_hosts_live"] = live
            values["courier_fleet_jobs_waiting"] = waiting
        return self.metrics.render(values)

    async def report(self, ready: bool, problems: list[str], twin: bool = False) -> dict[str, Any]:
        """The health body; `ok` is false (and the route answers 503) while the store
        cannot be read: intake answers 503 then too."""
        snapshot = self.comfy.queue_snapshot()
        store_ok = True
        outbox: dict[str, Any] = {}
        fleet: dict[str, Any] | None = None
        try:
            pending, dead = await self.store.outbox_backlog()
            outbox = {"pending": pending, "dead": dead}
            if self.fleet is not None:
                # counts only: this unauthenticated route names no host (metrics do)
                live, waiting = await self._fleet()
                fleet = {"hosts_live": live, "waiting": waiting}
        except StoreError:
            store_ok = False
            outbox = {"pending": None, "dead": None}
        outbox["delivered_since_start"] = self.deliverer.sent if self.deliverer else 0
        body: dict[str, Any] = {
            "ok": store_ok,
            "ready": ready,
            "queue": {
                "comfy_running": snapshot.busy,
                "comfy_pending": len(snapshot.numbers),
                "courier_unfinished": len(self.runs),  # of this process, as the limit counts
                "courier_max": self.settings.max_queue,
            },
            "outbox": outbox,
            "storage": self.storage.kind,
            "journal": self.store.kind,
            "callback_configured": self.settings.callback_url is not None,
            "signed_callbacks": bool(self.settings.webhook_secrets),
            "config_problems": len(problems),
            "instance_name_shared": twin,
        }
        if not store_ok:
            body["journal_error"] = "the store cannot be reached; jobs are refused (503)"
        if fleet is not None:
            body["fleet"] = fleet
        return body
