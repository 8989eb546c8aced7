"""KeyedLock: one holder per key at a time, keys independent, and nothing kept once the last
user of a key has left (including the hand-over from a releasing holder to a waiter)."""

from __future__ import annotations

import asyncio

from payments.keyed_lock import KeyedLock


async def test_one_holder_per_key_through_hand_overs() -> None:
    locks = KeyedLock()
    inside: dict[str, int] = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}
    order: list[int] = []

    async def user(key: str, n: int) -> None:
        async with locks.hold(key):
            inside[key] += 1
            most[key] = max(most[key], inside[key])
            order.append(n)
            await asyncio.sleep(0)  # let newcomers arrive while a waiter is being handed over
            await asyncio.sleep(0)
            inside[key] -= 1

    async def late(key: str, n: int, after: int) -> None:
        for _ in range(after):
            await asyncio.sleep(0)
        await user(key, n)

    await asyncio.gather(
        *(user("a", n) for n in range(5)),
        *(late("a", 10 + n, n) for n in range(5)),  # arrive during hand-overs
        *(user("b", 20 + n) for n in range(3)),
    )
    assert most == {"a": 1, "b": 1}
    assert sorted(order) == [*range(5), *range(10, 15), *range(20, 23)]
    assert len(locks) == 0


async def test_keys_do_not_wait_for_each_other() -> None:
    locks = KeyedLock()
    async with locks.hold("a"):
        await asyncio.wait_for(_enter(locks, "b"), 1)
        assert len(locks) == 1
    assert len(locks) == 0


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    locks = KeyedLock()
    async with locks.hold("a"):
        waiter = asyncio.create_task(_enter(locks, "a"))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
    assert len(locks) == 0


async def _enter(locks: KeyedLock, key: str) -> None:
    async with locks.hold(key):
        pass
