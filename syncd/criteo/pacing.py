"""Pacing to Criteo's per-app budget, and the cool-down every sender shares after a 429.

Both belong to one Criteo app (its credentials, its budget), so the client of that app
holds them for the life of the process: a second run starts where the first left off,
not with a fresh minute's burst.

Criteo documents the budget (about 250 calls a minute per app) and the headers that
describe it (`x-ratelimit-limit`, `-remaining`, `-reset`), not the kind of limiter: a
fixed one-minute window and a bucket that refills continuously and holds only a few
calls must both be met. Calls evenly spaced a little below the limit fit under both
(a window never sees more than the limit; a bucket refills faster than it is drained),
and only a small burst is allowed, so a bucket that holds a few calls is never
overdrawn. The limit is learned from every answer; SYNCD_RATE_LIMIT_PER_MIN caps it.
When an answer says nothing is left, calls wait until the reset it names.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from syncd.daemon.metrics import BUDGET_CALLS, BUDGET_LIMIT

# Calls are spaced for this share of the limit: evenly spaced calls at the full rate can
# meet a window's edge or a bucket's jitter one call early.
PACING_MARGIN = 0.99
# Calls that may go at once (a bucket that holds a few calls takes them).
BURST = 2
# No budget asks for a wait longer than this: a later reset is a wrong header.
MAX_HOLD_S = 3600.0
# Criteo's documented budget for client-credentials apps: assumed until an answer says.
ASSUMED_PER_MIN = 250


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
    """Spaces one app's calls to fit its budget (GCRA: a theoretical arrival time that
    advances by one interval per call, with a tolerance of BURST - 1 intervals)."""

    def __init__(
        self,
        ceiling_per_min: int,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        app: str = "default",
    ) -> None:
        self._ceiling = ceiling_per_min  # 0: none of the user's own
        self._limit: int | None = None  # what Criteo said, once it has
        # Until an answer arrives, Criteo's documented budget is assumed; an answer without
        # x-ratelimit-limit (before any with one) means the API meters nothing.
        self._heard = False
        self._clock = clock
        self._wall = wall
        self._app = app
        self._next = clock()  # the theoretical arrival time of the next call
        self._publish()

    def per_minute(self) -> int | None:
        """The calls per minute paced to: Criteo's limit (the documented one until an
        answer tells) capped by the ceiling; None (no pacing) for an API that meters
        nothing and no ceiling."""
        limit = self._limit if self._heard else ASSUMED_PER_MIN
        known = [n for n in (self._ceiling, limit) if n]
        return min(known) if known else None

    def interval_s(self) -> float:
        rate = self.per_minute()
        return 0.0 if rate is None else 60.0 / (rate * PACING_MARGIN)

    def reserve(self) -> float:
        """Take one call from the budget; return how long to wait before making it."""
        BUDGET_CALLS.labels(app=self._app).inc()
        interval = self.interval_s()
        if interval <= 0:
            return 0.0
        now = self._clock()
        start = max(self._next, now)
        wait = max(0.0, self._next - (BURST - 1) * interval - now)
        self._next = start + interval
        return wait

    def observe(self, headers: Mapping[str, str]) -> None:
        """Learn from an answer's x-ratelimit-* headers: the limit, and, when nothing is
        left, the reset before which no call is made."""
        limit = _whole(headers.get("x-ratelimit-limit"))
        if limit is not None and limit > 0 and (limit != self._limit or not self._heard):
            self._limit = limit
            self._heard = True
            self._publish()
        elif not self._heard:
            self._heard = True
            self._publish()
        if _whole(headers.get("x-ratelimit-remaining")) == 0:
            reset = _whole(headers.get("x-ratelimit-reset"))
            if reset is not None:
                self.hold(reset - self._wall())

    def hold(self, delay_s: float) -> None:
        """No call before `delay_s` from now (the budget is spent until then)."""
        delay = min(MAX_HOLD_S, delay_s)
        if delay > 0:
            tolerance = (BURST - 1) * self.interval_s()
            self._next = max(self._next, self._clock() + delay + tolerance)

    def _publish(self) -> None:
        BUDGET_LIMIT.labels(app=self._app).set(self.per_minute() or 0)


def _whole(raw: str | None) -> int | None:
    """A header's whole number, or None when it is missing or not one."""
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return int(value) if math.isfinite(value) else None
