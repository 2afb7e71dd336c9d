"""The per-id lock intake takes on every request."""

from __future__ import annotations

import asyncio

from comfy_courier.executor.keyed_lock import KeyedLock


async def test_one_holder_per_key_in_arrival_order():
    lock = KeyedLock()
    order: list[str] = []

    async def hold(key: str, name: str) -> None:
        async with lock(key):
            order.append(f"{name}+")
            await asyncio.sleep(0.01)
            order.append(f"{name}-")

    await asyncio.gather(hold("a", "a1"), hold("a", "a2"), hold("b", "b1"), hold("a", "a3"))
    a = [step for step in order if step.startswith("a")]
    assert a == ["a1+", "a1-", "a2+", "a2-", "a3+", "a3-"]
    assert order.index("b1+") < order.index("a1-")  # other keys do not wait
    assert len(lock) == 0


async def test_a_waiter_cancelled_before_its_turn_is_skipped():
    lock = KeyedLock()
    await lock.acquire("k")
    skipped = asyncio.ensure_future(lock.acquire("k"))
    after = asyncio.ensure_future(lock.acquire("k"))
    await asyncio.sleep(0)
    skipped.cancel()
    await asyncio.sleep(0)
    lock.release("k")
    await asyncio.wait_for(after, 1)
    assert skipped.cancelled()
    lock.release("k")
    assert len(lock) == 0


async def test_a_waiter_cancelled_after_it_was_handed_the_key_passes_it_on():
    lock = KeyedLock()
    await lock.acquire("k")
    handed = asyncio.ensure_future(lock.acquire("k"))
    after = asyncio.ensure_future(lock.acquire("k"))
    await asyncio.sleep(0)
    lock.release("k")  # `handed` now owns the key but has not resumed yet
    handed.cancel()
    await asyncio.wait_for(after, 1)
    assert handed.cancelled()
    lock.release("k")
    assert len(lock) == 0


async def test_an_exception_in_the_block_releases_the_key():
    lock = KeyedLock()
    try:
        async with lock("k"):
            raise ValueError("boom")
    except ValueError:
        pass
    assert len(lock) == 0
    async with lock("k"):
        assert len(lock) == 1
