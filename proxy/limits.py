"""The per-upstream request rate limit: a token bucket.

One sidecar serves one pod, so a bucket per upstream is a limit per pod, as
the policy's ``requestsPerMinute`` promises. The bucket holds a minute's worth
of requests at most (the burst) and refills continuously.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TokenBucket:
    __slots__ = ("_clock", "_stamp", "_tokens", "capacity", "rate")

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._tokens = self.capacity
        self._stamp = clock()

    def take(self) -> float:
        """Take one request; return 0 when allowed, else the seconds to wait (Retry-After)."""
        now = self._clock()
        tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(wait: float) -> str:
        return str(max(1, math.ceil(wait)))
