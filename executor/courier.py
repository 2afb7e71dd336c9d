"""The courier: wires the parts of a job's path and starts their background work.

    request -> Admission -> Store -> ComfyQueue -> (ComfyUI runs it; the node saves)
            -> WorkerEvents -> Uploader -> Settler (final state + outbox event, one commit)
            -> Deliverer (the callback)
    beside it: QueueWatch (starts, timeouts, a dead worker), Cancellation, Recovery
    (restarts, silent instances), Fencing (runs taken over elsewhere), Retention, Health.

Everything here runs on ComfyUI's server loop. The store is the source of truth; `Runs`
holds only the upload tasks and progress of jobs this process is running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import intake, redelivery
from .admission import Admission
from .cancellation import Cancellation
from .comfy_port import ComfyPort
from .comfy_queue import ComfyQueue
from .delivery import Deliverer
from .fencing import Fencing
from .health import Health
from .images import EncodedImage
from .keyed_lock import KeyedLock
from .metrics import Metrics
from .recovery import Recovery
from .retention import Retention
from .runs import Runs
from .settings import Settings
from .settle import Settler
from .status import StatusReader
from .status_updates import StatusNotifier
from .storage import Storage
from .store import OutboxEvent, Store
from .tasks import Background
from .uploads import Uploader
from .watch import QueueWatch
from .worker_events import WorkerEvents

log = logging.getLogger(__name__)


class Courier:
    def __init__(
        self,
        settings: Settings,
        comfy: ComfyPort,
        store: Store,
        storage: Storage,
        instance: str,
        deliverer: Deliverer | None = None,
        clock: Callable[[], float] = time.time,
        upload_schedule: tuple[float, ...] = (0.5, 2.0, 8.0),
        status: StatusNotifier | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.comfy = comfy
        self.store = store
        self.storage = storage
        self.instance = instance
        self.deliverer = deliverer
        self.clock = clock
        self.metrics = metrics = metrics or Metrics()
        if deliverer is not None:
            deliverer.on_outcome = lambda outcome: metrics.callback_attempts.labels(outcome).inc()
        self.ready = asyncio.Event()
        self.twin = False  # another live process holds this instance name
        # settings.problems, plus what start-up checks find (wiring.check_storage appends)
        self.config_problems: list[str] = list(settings.problems)
        self.runs = runs = Runs()
        self.background = background = Background()
        id_locks = KeyedLock()
        self.queue = queue = ComfyQueue(comfy, runs, clock)
        self.status_reader = reader = StatusReader(settings, store, runs, queue)
        self.uploader = uploader = Uploader(
            settings, store, storage, comfy, metrics, upload_schedule, background
        )
        self.fencing = fencing = Fencing(store, runs, comfy, instance, status)
        self.settler = settler = Settler(
            settings, store, runs, uploader, clock, metrics, deliverer, status, background,
            fencing,
        )  # fmt: skip
        self.admission = Admission(
            settings, store, runs, queue, reader, settler, background, id_locks, instance,
            clock, metrics, status,
        )  # fmt: skip
        self.cancellation = cancellation = Cancellation(
            store, runs, comfy, settler, reader, id_locks, instance
        )
        self.worker_events = WorkerEvents(runs, settler, uploader, background, clock, status)
        self.watch = QueueWatch(settings, comfy, runs, settler, cancellation, clock)
        self.recovery = Recovery(
            settings, store, runs, queue, uploader, settler, background, instance, clock,
            deliverer, fencing,
        )  # fmt: skip
        self.retention = Retention(settings, store, clock, metrics)
        self.health_report = Health(settings, comfy, store, storage, runs, metrics, deliverer)

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous process left, then watch the queue and deliver."""
        self.worker_events.listen(self.comfy, asyncio.get_running_loop())
        if not await asyncio.to_thread(self.store.claim_instance, self.instance):
            self.twin = True
            log.critical(
                "[courier] another live process runs as instance %r (COURIER_INSTANCE, or "
                "equal hostname and port): this one recovers and adopts nothing; give each "
                "ComfyUI process its own COURIER_INSTANCE",
                self.instance,
            )
            self.recovery.enabled = False
            self.config_problems.append(f"instance name {self.instance!r} is in use")
        await self.store.heartbeat(self.instance, self.clock())
        await self.recovery.adopt_orphans()
        await self.recovery.recover()
        self.ready.set()
        spawn = self.background.spawn
        spawn(self.watch.run())
        spawn(self.recovery.keep_alive())
        spawn(self.retention.run())
        if self.deliverer is not None:
            spawn(self.deliverer.run())

    async def stop(self) -> None:
        await self.background.stop()
        self.store.release_instance()
        if self.deliverer is not None:
            await self.deliverer.close()
        close_storage = getattr(self.storage, "aclose", None)  # its HTTP connections
        if close_storage is not None:
            await close_storage()

    def journal_lost(self) -> None:
        """The store lost calls in flight: requeue what it committed but never answered.

        An admission written just before the loss is in the store but not in ComfyUI's
        queue (its request got a 503; the retry gets a replay); recovery resubmits it.
        """
        if self.ready.is_set():
            self.background.spawn(self.recovery.recover())

    # -- what routes and the node call ----------------------------------------------------

    async def submit(self, request: intake.Request) -> tuple[int, dict[str, Any]]:
        return await self.admission.submit(request)

    async def status(self, content_request_id: str) -> dict[str, Any]:
        return await self.status_reader(content_request_id)

    async def cancel(self, content_request_id: str) -> dict[str, Any]:
        return await self.cancellation(content_request_id)

    async def redeliver(
        self, content_request_id: str | None = None, dead_since: float | None = None
    ) -> list[OutboxEvent]:
        """Dead-lettered callbacks back to the outbox, sent by this instance (redelivery.py)."""
        return await redelivery.redeliver(
            self.store,
            self.deliverer,
            self.instance,
            self.clock(),
            content_request_id=content_request_id,
            dead_since=dead_since,
        )

    def from_worker(self, callback: Callable[..., Any], *args: Any) -> None:
        self.worker_events.from_worker(callback, *args)

    def images_saved(
        self,
        prompt_id: str,
        node_id: str,
        content_request_id: str,
        images: list[tuple[EncodedImage, Path]],
    ) -> None:
        self.worker_events.images_saved(prompt_id, node_id, content_request_id, images)

    async def health(self) -> dict[str, Any]:
        return await self.health_report.report(self.ready.is_set(), self.config_problems, self.twin)

    async def metrics_text(self) -> bytes:
        return await self.health_report.metrics_text()

    # -- for operations and tests -------------------------------------------------------

    async def recover(self) -> None:
        await self.recovery.recover()

    async def adopt_orphans(self) -> list[str]:
        return await self.recovery.adopt_orphans()

    async def prune(self) -> int:
        return await self.retention.prune()

    async def watch_once(self) -> None:
        await self.watch.once()
