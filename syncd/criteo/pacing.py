"""Pacing to Criteo's per-app budget, and the cool-down every sender shares after a 429.

Both belong to one Criteo app (its credentials, its budget), so the client of that app
holds them for the life of the process: a second run starts where the first left off,
not with a fresh minute's burst.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Cooldown:
    """One shared back-off: when Criteo answers 429, every sender waits, not just one."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until = 0.0

    def trip(self, delay_s: float) -> None:
        self._until = max(self._until, self._clock() + delay_s)

    def remaining_s(self) -> float:
        return max(0.0, self._until - self._clock())

    @property
    def until(self) -> float:
        """When it ends (on the clock): a sender that waited for it can tell whether
        another 429 pushed it further meanwhile."""
        return self._until


class Pacer:
    """A token bucket over Criteo's per-app budget (about 250 calls a minute): a minute's
    worth of calls may go at once, then calls are spaced evenly. Pacing below the limit
    beats bouncing off 429s."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = per_minute / 60.0
        self._capacity = float(per_minute)
        self._tokens = float(per_minute)
        self._clock = clock
        self._last = clock()

    def reserve(self) -> float:
        """Take one call from the budget; return how long to wait before making it."""
        if self._rate <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        self._tokens -= 1.0  # below zero: calls already queued for later
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate
