"""One holder at a time per key (a content_request_id), first come first served.

Intake takes this lock on every request, so it is built for the uncontended case: taking a
free key is a dict insert with no Lock object, no generator and no suspension. Memory is
held only for keys in use.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable
from typing import Any


class KeyedLock:
    def __init__(self) -> None:
        self._waiters: dict[Hashable, deque[asyncio.Future[None]]] = {}  # held keys

    def __len__(self) -> int:
        """Keys held now."""
        return len(self._waiters)

    def __call__(self, key: Hashable) -> _Held:
        """`async with lock(key):` holds `key` for the block."""
        return _Held(self, key)

    async def acquire(self, key: Hashable) -> None:
        waiters = self._waiters.get(key)
        if waiters is None:
            self._waiters[key] = deque()
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.cancelled():  # handed the key, then cancelled: pass it on
                self.release(key)
            raise  # a cancelled waiter is skipped by release

    def release(self, key: Hashable) -> None:
        waiters = self._waiters[key]
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the key passes straight to the next waiter
                return
        del self._waiters[key]


class _Held:
    __slots__ = ("_lock", "_key")

    def __init__(self, lock: KeyedLock, key: Hashable) -> None:
        self._lock = lock
        self._key = key

    async def __aenter__(self) -> None:
        await self._lock.acquire(self._key)

    async def __aexit__(self, *exc: Any) -> None:
        self._lock.release(self._key)
