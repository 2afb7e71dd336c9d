"""/courier/health and /courier/metrics: what an operator or a load balancer reads."""

from __future__ import annotations

from typing import Any

from .comfy_port import ComfyPort
from .delivery import Deliverer
from .metrics import Metrics
from .runs import Runs
from .settings import Settings
from .storage import Storage
from .store import Store


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

    async def metrics_text(self) -> bytes:
        snapshot = self.comfy.queue_snapshot()
        pending, dead = await self.store.outbox_backlog()
        return self.metrics.render(
            {
                "courier_unfinished_jobs": len(self.runs),
                "courier_comfy_queue_pending": len(snapshot.pending),
                "courier_comfy_queue_running": len(snapshot.running),
                "courier_outbox_pending": pending,
                "courier_outbox_dead": dead,
            }
        )

    async def report(self, ready: bool, problems: list[str], twin: bool = False) -> dict[str, Any]:
        snapshot = self.comfy.queue_snapshot()
        pending, dead = await self.store.outbox_backlog()
        return {
            "ok": True,
            "ready": ready,
            "queue": {
                "comfy_running": len(snapshot.running),
                "comfy_pending": len(snapshot.pending),
                "courier_unfinished": len(self.runs),  # of this process, as the limit counts
                "courier_max": self.settings.max_queue,
            },
            "outbox": {
                "pending": pending,
                "dead": dead,
                "delivered_since_start": self.deliverer.sent if self.deliverer else 0,
            },
            "storage": self.storage.kind,
            "journal": self.store.kind,
            "callback_configured": self.settings.callback_url is not None,
            "signed_callbacks": bool(self.settings.webhook_secrets),
            "config_problems": len(problems),
            "instance_name_shared": twin,
        }
