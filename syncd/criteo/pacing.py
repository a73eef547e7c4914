"""Pacing to Criteo's per-app budget, the cool-down every sender shares after a 429, and
the backoff between a chunk's attempts.

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
import random
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from syncd.daemon.metrics import BUDGET_CALLS, BUDGET_LIMIT

# Calls are spaced for this share of the limit: evenly spaced calls at the full rate can
# meet a window's edge or a bucket's jitter one call early (at 250 a minute, 248.75: any
# minute holds at most 249 calls).
PACING_MARGIN = 0.995
# Calls that may go at once. One: calls strictly spaced keep a bucket that holds a few
# calls full, so a call that leaves late and one that leaves on time never overdraw it
# (a burst at the start would spend that slack for minutes, at a margin of 1 %).
BURST = 1
# No budget asks for a wait longer than this: a later reset is a wrong header.
MAX_HOLD_S = 3600.0
# x-ratelimit-reset is in whole seconds: a reset this close is no more than rounding.
NEAR_RESET_S = 1.0
# Criteo's documented budget for client-credentials apps: assumed until an answer says.
ASSUMED_PER_MIN = 250


class SharedBudget(Protocol):
    """Where every process's reservations for an app meet (syncd.budget: PostgreSQL)."""

    async def reserve(
        self, app: str, interval_s: float, tolerance_s: float, per_minute: int | None
    ) -> float: ...

    async def hold(self, app: str, until_epoch_s: float, tolerance_s: float) -> None: ...

    async def note_limit(self, app: str, per_minute: int | None) -> None: ...

    async def rate_limited(self, app: str) -> None: ...


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
        shared: SharedBudget | None = None,
    ) -> None:
        # With `shared`, every process's calls for this app draw on one budget; without
        # it (a client on its own, as in unit tests), this process's calls only.
        self._shared = shared
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

    async def acquire(self) -> float:
        """Take one call from the app's budget (the shared one when there is one); return
        how long to wait before making it."""
        if self._shared is None:
            return self.reserve()
        BUDGET_CALLS.labels(app=self._app).inc()
        interval = self.interval_s()
        return await self._shared.reserve(
            self._app, interval, (BURST - 1) * interval, self.per_minute()
        )

    async def learn(self, headers: Mapping[str, str], status: int) -> None:
        """`observe`, and tell every process of the app when nothing is left."""
        before = self.per_minute()
        reset = self.observe(headers)
        if self._shared is None:
            return
        if self.per_minute() != before:
            await self._shared.note_limit(self._app, self.per_minute())
        if reset is not None:
            until = min(reset, self._wall() + MAX_HOLD_S)
            await self._shared.hold(self._app, until, (BURST - 1) * self.interval_s())
        if status == 429:
            await self._shared.rate_limited(self._app)

    def observe(self, headers: Mapping[str, str]) -> float | None:
        """Learn from an answer's x-ratelimit-* headers: the limit, and, when nothing is
        left, the reset before which no call is made (returned, epoch seconds)."""
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
            # A reset within about a second is a bucket's next call (the header counts in
            # whole seconds): the pacing's spacing already waits for it. Further off, the
            # budget is spent until then (a window used up, by other apps' users too).
            if reset is not None and reset - self._wall() > NEAR_RESET_S + 2 * self.interval_s():
                self.hold(reset - self._wall())
                return float(reset)
        return None

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


# --- retrying: how long a sender waits before its next attempt (push.py) ------------


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Capped exponential backoff with full jitter: uniform(0, min(cap, base * 2^(n-1)))."""
    return random.uniform(0, _step_s(attempt, base_s, cap_s))


def retry_wait_s(attempt: int, retry_after_s: float | None, base_s: float, cap_s: float) -> float:
    """The wait after attempt `attempt` failed: the API's Retry-After when it gave one, but
    never less than the backoff step (a 0, or a reset already past, must not turn the
    attempts into one burst); without one, capped full-jitter backoff."""
    if retry_after_s is None:
        return backoff_s(attempt, base_s, cap_s)
    return max(retry_after_s, _step_s(attempt, base_s, cap_s))


def _step_s(attempt: int, base_s: float, cap_s: float) -> float:
    return min(cap_s, base_s * 2.0 ** min(attempt - 1, 64))
