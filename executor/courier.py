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
from .claims import Claimer
from .comfy_port import ComfyPort
from .comfy_queue import ComfyQueue
from .delivery import Deliverer
from .errors import StoreError
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
from .store import Fleet, OutboxEvent, Store
from .tasks import Background
from .uploads import Uploader
from .watch import QueueWatch
from .worker_events import WorkerEvents

log = logging.getLogger(__name__)

START_RETRY = (1.0, 30.0)  # s: the first wait for a store unreachable at start-up, the longest


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
        monotonic: Callable[[], float] = time.monotonic,
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
        self.status_updates = status
        self.clock = clock  # wall: only for times the store keeps
        self.monotonic = monotonic  # durations measured in this process
        # a store shared by several hosts (Postgres): waiting jobs, claims, notices
        self.fleet = fleet = store if isinstance(store, Fleet) else None
        self.metrics = metrics = metrics or Metrics(instance if fleet is not None else None)
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
        self.watch = QueueWatch(settings, comfy, runs, settler, cancellation, clock, monotonic)
        self.recovery = Recovery(
            settings, store, runs, queue, uploader, settler, background, instance, clock,
            deliverer, fencing, monotonic,
        )  # fmt: skip
        self.retention = Retention(settings, store, clock, metrics)
        self.health_report = Health(settings, comfy, store, storage, runs, metrics, deliverer)
        self.claims: Claimer | None = None
        if fleet is not None:
            self._join_fleet(fleet)

    def _join_fleet(self, fleet: Fleet) -> None:
        """Work goes to idle hosts: a job this host cannot start now waits in the store
        for any host's claimer; DELETEs and new jobs reach hosts by the store's notices."""
        deliverer = self.deliverer
        self.claims = claims = Claimer(
            fleet, self.runs, self.queue, self.settler, self.instance, self.clock, self.metrics,
            on_poll=deliverer.wake if deliverer is not None else lambda: None,
        )  # fmt: skip
        self.runs.on_free = claims.wake
        self.admission.claims = claims
        self.status_reader.fleet = fleet
        self.recovery.fleet = fleet
        self.recovery.on_released = claims.wake
        self.health_report.fleet = fleet
        self.health_report.claims = claims
        self.health_report.clock = self.clock

    def _notice(self, kind: str, argument: str) -> None:
        """A notice from the store: a job waits, a DELETE for this host, or (after the
        listener reconnected) either may have been missed."""
        if self.claims is not None:
            self.claims.notice(kind, argument)
        if (kind == "cancel" and argument == self.instance) or kind == "reconnected":
            if self.ready.is_set() and self.runs.by_prompt:
                self.background.spawn(self.cancellation.apply_requests())

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous process left, then watch the queue and deliver.

        A store that cannot be reached yet (a database still starting, or down) is tried
        again until it answers; meanwhile requests get 503 ("still starting"). So is an
        instance name another live process holds: this one stands by until it is free.
        """
        self.worker_events.listen(self.comfy, asyncio.get_running_loop())
        delay = START_RETRY[0]
        claimed = False
        while True:
            try:
                if not claimed:
                    claimed = await asyncio.to_thread(self.store.claim_instance, self.instance)
                if not claimed:
                    self._stand_by()
                    await asyncio.sleep(self.recovery.heartbeat_interval)
                    continue
                if self.twin:
                    self._name_free()
                await self.store.heartbeat(self.instance, self.clock())
                await self.recovery.adopt_orphans()
                await self.recovery.recover()
                break
            except StoreError as e:
                log.error("[courier] store unavailable at start-up (%s); retrying in %.0f s",
                          e, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, START_RETRY[1])
        self.ready.set()
        spawn = self.background.spawn
        spawn(self.watch.run())
        spawn(self.recovery.keep_alive())
        spawn(self.retention.run())
        if self.deliverer is not None:
            spawn(self.deliverer.run())
        if self.fleet is not None and self.claims is not None:
            spawn(self.fleet.listen(self._notice))
            spawn(self.claims.run())

    def _stand_by(self) -> None:
        """Another live process holds this instance name: accept, claim and recover nothing.

        Its jobs would look like this one's (the store knows jobs by instance name): a job
        accepted here could be run again by that process's recovery, and this one's would
        resubmit that one's. So this process only waits for the name, answering 503.
        """
        if self.twin:
            return
        self.twin = True
        log.critical(
            "[courier] another live process runs as instance %r (COURIER_INSTANCE, or "
            "equal hostname and port): this one accepts no job (503) and stands by until "
            "that process stops; give each ComfyUI process its own COURIER_INSTANCE",
            self.instance,
        )
        self.config_problems.append(f"instance name {self.instance!r} is in use")

    def _name_free(self) -> None:
        self.twin = False
        self.config_problems.remove(f"instance name {self.instance!r} is in use")
        log.warning(
            "[courier] instance %r is free again: this process takes over its unfinished "
            "work and starts accepting jobs",
            self.instance,
        )

    async def stop(self) -> None:
        await self.background.stop()
        self.store.release_instance()
        if self.deliverer is not None:
            await self.deliverer.close()
        if self.status_updates is not None:
            await self.status_updates.aclose()
        close_storage = getattr(self.storage, "aclose", None)  # its HTTP connections
        if close_storage is not None:
            await close_storage()

    def journal_lost(self) -> None:
        """The store lost calls in flight: requeue what it committed but never answered.

        An admission written just before the loss is in the store but not in ComfyUI's
        queue (its request got a 503; the retry gets a replay); recovery resubmits it. A
        final event written just before it is in the outbox, and nothing else would tell
        the deliverer: it reads the outbox again.
        """
        if self.deliverer is not None:
            self.deliverer.rescan_soon()
        if self.ready.is_set():
            self.background.spawn(self.recovery.recover())

    def store_failed(self) -> None:
        """A store call failed (written or not): the deliverer reads the outbox again soon."""
        if self.deliverer is not None:
            self.deliverer.rescan_soon()

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
        courier_item: bool,
    ) -> None:
        self.worker_events.images_saved(
            prompt_id, node_id, content_request_id, images, courier_item
        )

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
