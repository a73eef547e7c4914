"""When `syncd run` runs, and for which window: the pure rules, then the APScheduler wiring.

A window is one of SYNCD_WINDOWS_UTC on some day: Criteo computes its audiences then, so a
change pushed before it goes live about 5 h later and one pushed after waits for the next.
A run targets the first window strictly after its start (the same rule as `start_run` in
runs.sql), and that window is its deadline. Runs fire SYNCD_LEAD_MINUTES before each
window, and optionally every SYNCD_INTERVAL_MINUTES for fresher lists.

Each run has a slot, a key every replica computes alike from the clock alone: the window's
time for a window run, the interval's boundary (counted from the Unix epoch) for an
interval run. The run row of a slot is inserted with ON CONFLICT DO NOTHING on that key, so
only one replica runs it (syncd.daemon.service).

APScheduler only signals the service: APScheduler 3 cancels coroutine jobs when it shuts
down, so the run itself is a task the service owns.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

SlotKind = Literal["window", "interval"]
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# A fire APScheduler could not start on time (a busy loop, a suspended VM) still runs up
# to this late: the slot row, not the scheduler, keeps it from running twice.
MISFIRE_GRACE_S = 600


@dataclass(frozen=True)
class Slot:
    kind: SlotKind
    start: dt.datetime  # the window (window runs) or the interval's boundary (interval runs)
    window: dt.datetime  # the window the run targets: its deadline

    @property
    def key(self) -> str:
        """The same on every replica: the unique key of the slot's run row."""
        return f"{self.kind}:{self.start.astimezone(dt.UTC).isoformat()}"


def next_window(now: dt.datetime, windows: Sequence[dt.time]) -> dt.datetime:
    """The first window strictly after `now` (a run started at a window is late for it)."""
    now = now.astimezone(dt.UTC)
    for days in range(2):
        day = now.date() + dt.timedelta(days=days)
        for time in sorted(windows):
            candidate = dt.datetime.combine(day, time, tzinfo=dt.UTC)
            if candidate > now:
                return candidate
    raise ValueError("no window configured")


def last_window(now: dt.datetime, windows: Sequence[dt.time]) -> dt.datetime:
    """The latest window at or before `now`."""
    now = now.astimezone(dt.UTC)
    for days in range(2):
        day = now.date() - dt.timedelta(days=days)
        for time in sorted(windows, reverse=True):
            candidate = dt.datetime.combine(day, time, tzinfo=dt.UTC)
            if candidate <= now:
                return candidate
    raise ValueError("no window configured")


def verify_delay(after_hours: float) -> dt.timedelta:
    """How long after a window its verification fires: whole minutes, as cron fires."""
    return dt.timedelta(minutes=round(after_hours * 60))


def verify_cron_fields(window: dt.time, after_hours: float) -> dict[str, int]:
    """The CronTrigger hour and minute that fire `after_hours` after a daily window."""
    return cron_fields(window, -int(verify_delay(after_hours).total_seconds() // 60))


def verified_window(
    now: dt.datetime, windows: Sequence[dt.time], after_hours: float
) -> dt.datetime:
    """The window a verification firing at `now` checks: the last one its delay has passed
    (with the delay in whole minutes, as the job fires, not the exact hours)."""
    return last_window(now - verify_delay(after_hours), windows)


def window_slot(now: dt.datetime, windows: Sequence[dt.time]) -> Slot:
    """The window slot a run fired (or started late) at `now` targets."""
    window = next_window(now, windows)
    return Slot("window", window, window)


def interval_slot(now: dt.datetime, windows: Sequence[dt.time], minutes: int) -> Slot:
    """The interval slot of `now`: the last multiple of `minutes` since the epoch."""
    step = dt.timedelta(minutes=minutes)
    start = EPOCH + ((now.astimezone(dt.UTC) - EPOCH) // step) * step
    return Slot("interval", start, next_window(now, windows))


def due_at_start(now: dt.datetime, windows: Sequence[dt.time], lead_minutes: int) -> Slot | None:
    """Started late or after downtime: the slot to run at once, when the next window's fire
    time (window minus lead) has passed. Whether its run already happened is the slot row's
    to say (the insert loses), not the clock's."""
    slot = window_slot(now, windows)
    if slot.window - dt.timedelta(minutes=lead_minutes) <= now:
        return slot
    return None


def fire_times(
    now: dt.datetime, windows: Sequence[dt.time], lead_minutes: int, count: int
) -> list[dt.datetime]:
    """The next `count` window fire times strictly after `now` (window minus lead)."""
    lead = dt.timedelta(minutes=lead_minutes)
    found: list[dt.datetime] = []
    probe = now
    while len(found) < count:
        window = next_window(probe + lead, windows)
        found.append(window - lead)
        probe = window - lead
    return found


def cron_fields(window: dt.time, lead_minutes: int) -> dict[str, int]:
    """The CronTrigger hour and minute that fire `lead_minutes` before a daily window."""
    minutes = (window.hour * 60 + window.minute - lead_minutes) % (24 * 60)
    return {"hour": minutes // 60, "minute": minutes % 60}


def build_scheduler(
    windows: Sequence[dt.time],
    lead_minutes: int,
    interval_minutes: int,
    fire: Callable[[SlotKind], Awaitable[None]],
    verify: Callable[[], Awaitable[None]] | None = None,
    verify_after_hours: float = 0.0,
) -> Any:
    """An AsyncIOScheduler (UTC, in-memory) with one cron job per window and, when set, one
    interval job. Each job only calls `fire(kind)`; start it from inside the event loop.
    With `verify`, also one job `verify_after_hours` after each window."""
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    scheduler = AsyncIOScheduler(timezone=dt.UTC)  # the default job store: in memory
    # Several missed fires make one run; never two at once; a late fire still runs.
    job = {"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_S}
    for window in sorted(set(windows)):
        scheduler.add_job(
            fire,
            CronTrigger(**cron_fields(window, lead_minutes), timezone=dt.UTC),
            args=["window"],
            id=f"window-{window.strftime('%H%M')}",
            replace_existing=True,
            **job,
        )
    if interval_minutes:
        scheduler.add_job(
            fire,
            # From the epoch: every replica's boundaries, hence slot keys, are the same.
            IntervalTrigger(minutes=interval_minutes, start_date=EPOCH, timezone=dt.UTC),
            args=["interval"],
            id="interval",
            replace_existing=True,
            **job,
        )
    if verify is not None and verify_after_hours > 0:
        for window in sorted(set(windows)):
            scheduler.add_job(
                verify,
                CronTrigger(**verify_cron_fields(window, verify_after_hours), timezone=dt.UTC),
                id=f"verify-{window.strftime('%H%M')}",
                replace_existing=True,
                **job,
            )
    return scheduler
