"""Retention: finished jobs older than COURIER_RETENTION_DAYS are slimmed to their outcome."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .metrics import Metrics
from .settings import Settings
from .store import Store

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 3600.0
# Intake waits behind a pruning batch in the journal process: on a 100k-job journal 50
# attempts hold it 3 ms at p50 and ~20 ms at p99, when the batch runs a WAL checkpoint
# (benchmarks/bench_journal.py). The pause leaves the journal idle ~97 % of a long prune.
PRUNE_BATCH = 50
PRUNE_PAUSE = 0.1


class Retention:
    def __init__(
        self, settings: Settings, store: Store, clock: Callable[[], float], metrics: Metrics
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.metrics = metrics

    async def run(self) -> None:
        while True:
            try:
                await self.prune()
            except Exception:
                log.exception("[courier] journal pruning failed")
            await asyncio.sleep(PRUNE_INTERVAL)

    async def prune(self) -> int:
        """Slim finished jobs older than COURIER_RETENTION_DAYS to their outcome; how many.

        Without it the journal grows by ~3 KB a job forever, with it by ~0.4 KB. One
        batch per store call, so an admission waits behind one batch at most.
        """
        days = self.settings.retention_days
        if not days:
            return 0
        cutoff = self.clock() - days * 86400
        total = 0
        while True:
            pruned = await self.store.prune(cutoff, PRUNE_BATCH)
            total += pruned
            self.metrics.jobs_pruned.inc(pruned)
            if pruned < PRUNE_BATCH:
                break
            await asyncio.sleep(PRUNE_PAUSE)
        if total:
            log.info("[courier] pruned %d jobs that finished over %g days ago", total, days)
        return total
