"""Token buckets for the 402 path: unpaid challenges per client IP, refused payments per payer.

Each bucket holds `burst` tokens and refills `rate` per second. Memory is bounded: the least
recently used keys are dropped past `max_keys` (a dropped key simply starts full again).
Process-local on purpose: it sheds abuse before it costs RPC calls; it is not an accounting
control, so replicas need not share it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["TokenBuckets", "buckets"]


class TokenBuckets:
    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Take one token: 0.0 if allowed, else the seconds until one is available."""
        now = self._clock()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def peek(self, key: str) -> float:
        """Seconds until `key` has a token, without taking one."""
        entry = self._buckets.get(key)
        if entry is None:
            return 0.0
        tokens, last = entry
        tokens = min(float(self.burst), tokens + (self._clock() - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(wait: float) -> int:
        return max(1, math.ceil(wait))


def buckets(rate: float, burst: int) -> TokenBuckets | None:
    """Buckets for a configured limit; a rate of 0 turns the limit off."""
    return TokenBuckets(rate, burst) if rate > 0 else None
