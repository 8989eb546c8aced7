"""`KeyedLock`: one asyncio lock per key (a payment id, say), kept only while someone holds
or waits for it. Counting the users is what makes dropping it safe: a lock that is merely
unlocked may still have a waiter about to take it, and a newcomer given a fresh lock would
then run beside that waiter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

__all__ = ["KeyedLock"]


class KeyedLock:
    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[asyncio.Lock, list[int]]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._entries.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
