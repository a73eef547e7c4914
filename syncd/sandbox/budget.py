"""The sandbox's call budget, one per client id, enforced the two ways Criteo might.

Criteo documents about 250 calls a minute per application and the ``x-ratelimit-limit``,
``x-ratelimit-remaining`` and ``x-ratelimit-reset`` headers, but not the kind of limiter.
The sandbox offers both, so syncd is tested against either:

- ``window``: a fixed one-minute window opened by its first call; ``reset`` is the epoch
  second the window ends.
- ``bucket``: a bucket that refills continuously at the per-minute rate and holds only
  ``burst`` calls, so a minute's worth sent at once is refused; ``reset`` is the epoch
  second the next call is allowed again.

Budgets are per client id (the app a token was issued to): two apps, two budgets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

from syncd.sandbox.config import RATE_WINDOW_S

RateLimitMode = Literal["window", "bucket"]
RATE_LIMIT_MODES: tuple[RateLimitMode, ...] = ("window", "bucket")


class _Window:
    def __init__(self) -> None:
        self.start: float | None = None
        self.used = 0

    def _roll(self, now: float) -> float:
        if self.start is None or now >= self.start + RATE_WINDOW_S:
            self.start = now
            self.used = 0
        return self.start

    def acquire(self, now: float, limit: int) -> bool:
        self._roll(now)
        if self.used >= limit:
            return False
        self.used += 1
        return True

    def state(self, now: float, limit: int) -> tuple[int, float]:
        """(remaining, reset epoch)"""
        start = self._roll(now)
        return max(0, limit - self.used), start + RATE_WINDOW_S


class _Bucket:
    def __init__(self, burst: int) -> None:
        self.tokens = float(burst)
        self.last: float | None = None

    def _refill(self, now: float, limit: int, burst: int) -> None:
        if self.last is not None:
            self.tokens = min(float(burst), self.tokens + (now - self.last) * limit / RATE_WINDOW_S)
        self.last = now

    def acquire(self, now: float, limit: int, burst: int) -> bool:
        self._refill(now, limit, burst)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def state(self, now: float, limit: int, burst: int) -> tuple[int, float]:
        self._refill(now, limit, burst)
        missing = max(0.0, 1.0 - self.tokens)
        return math.floor(self.tokens), now + missing * RATE_WINDOW_S / limit


class Budgets:
    """Every client id's budget. ``clock`` (epoch seconds) may be replaced by a test."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        self._buckets: dict[str, _Bucket] = {}

    def reset(self) -> None:
        self._windows.clear()
        self._buckets.clear()

    def acquire(self, client_id: str, limit: int, mode: RateLimitMode, burst: int) -> bool:
        """Spend one call of this client's budget; False (nothing spent) when it is used up."""
        now = self.clock()
        if mode == "bucket":
            return self._buckets.setdefault(client_id, _Bucket(burst)).acquire(now, limit, burst)
        return self._windows.setdefault(client_id, _Window()).acquire(now, limit)

    def _state(
        self, client_id: str, limit: int, mode: RateLimitMode, burst: int
    ) -> tuple[int, float]:
        now = self.clock()
        if mode == "bucket":
            return self._buckets.setdefault(client_id, _Bucket(burst)).state(now, limit, burst)
        return self._windows.setdefault(client_id, _Window()).state(now, limit)

    def headers(
        self, client_id: str, limit: int, mode: RateLimitMode, burst: int
    ) -> dict[str, str]:
        """The documented x-ratelimit-* headers for this client, as of now."""
        remaining, reset = self._state(client_id, limit, mode, burst)
        return {
            "x-ratelimit-limit": str(limit),
            "x-ratelimit-remaining": str(remaining),
            "x-ratelimit-reset": str(math.ceil(reset)),
        }

    def retry_after_s(self, client_id: str, limit: int, mode: RateLimitMode, burst: int) -> int:
        """Whole seconds until this client may call again (for an optional Retry-After)."""
        _, reset = self._state(client_id, limit, mode, burst)
        return max(1, math.ceil(reset - self.clock()))
