"""The daemon's schedule: fire times, the window each run targets, the late-start rule, and
the APScheduler triggers built from the settings, all against an injected clock."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace
from typing import Any

import pytest

from syncd.config import Settings
from syncd.daemon import schedule
from syncd.daemon.schedule import Slot, SlotKind
from syncd.daemon.service import Service

UTC = dt.UTC
DEFAULT = (dt.time(0, 0), dt.time(12, 0))


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


async def _ignore(kind: SlotKind) -> None:
    return None


def test_fire_times_are_the_lead_before_each_window() -> None:
    fires = schedule.fire_times(at("2026-12-01 03:17"), DEFAULT, 60, 4)
    assert fires == [
        at("2026-12-01 11:00"),
        at("2026-12-01 23:00"),
        at("2026-12-02 11:00"),
        at("2026-12-02 23:00"),
    ]


def test_fire_times_with_a_lead_that_crosses_midnight_and_uneven_windows() -> None:
    windows = (dt.time(0, 30), dt.time(6, 0), dt.time(18, 45))
    fires = schedule.fire_times(at("2026-12-01 23:59"), windows, 90, 4)
    assert fires == [
        at("2026-12-02 04:30"),
        at("2026-12-02 17:15"),
        at("2026-12-02 23:00"),
        at("2026-12-03 04:30"),
    ]


def test_a_run_targets_the_first_window_strictly_after_it() -> None:
    assert schedule.window_slot(at("2026-12-01 11:00"), DEFAULT) == Slot(
        "window", at("2026-12-01 12:00"), at("2026-12-01 12:00")
    )
    # At the window itself it is too late for it: the next one.
    assert schedule.next_window(at("2026-12-01 12:00"), DEFAULT) == at("2026-12-02 00:00")
    assert schedule.next_window(at("2026-12-01 23:59:59"), DEFAULT) == at("2026-12-02 00:00")


def test_late_start_runs_at_once_only_inside_the_lead_of_the_next_window() -> None:
    # Started 11:20 with a 60-minute lead: the 12:00 run should have fired at 11:00.
    due = schedule.due_at_start(at("2026-12-01 11:20"), DEFAULT, 60)
    assert due == Slot("window", at("2026-12-01 12:00"), at("2026-12-01 12:00"))
    assert due.key == "window:2026-12-01T12:00:00+00:00"
    # Exactly at the fire time: due too (the cron fire may be a hair later).
    assert schedule.due_at_start(at("2026-12-01 11:00"), DEFAULT, 60) is not None
    # Before the fire time: the scheduler fires it.
    assert schedule.due_at_start(at("2026-12-01 10:59"), DEFAULT, 60) is None
    # After a window passed (downtime over it): the next window is what is still ahead.
    assert schedule.due_at_start(at("2026-12-01 12:01"), DEFAULT, 60) is None
    assert schedule.due_at_start(at("2026-12-01 23:30"), DEFAULT, 60) == Slot(
        "window", at("2026-12-02 00:00"), at("2026-12-02 00:00")
    )


def test_interval_slots_are_the_same_on_every_replica() -> None:
    first = schedule.interval_slot(at("2026-12-01 03:17:42"), DEFAULT, 15)
    second = schedule.interval_slot(at("2026-12-01 03:29:59"), DEFAULT, 15)
    assert first == second
    assert first.key == "interval:2026-12-01T03:15:00+00:00"
    assert first.window == at("2026-12-01 12:00")
    assert schedule.interval_slot(at("2026-12-01 03:30"), DEFAULT, 15).start == at(
        "2026-12-01 03:30"
    )


@pytest.mark.parametrize(
    ("window", "lead", "fields"),
    [
        (dt.time(0, 0), 60, {"hour": 23, "minute": 0}),
        (dt.time(12, 0), 60, {"hour": 11, "minute": 0}),
        (dt.time(0, 15), 30, {"hour": 23, "minute": 45}),
        (dt.time(6, 0), 0, {"hour": 6, "minute": 0}),
        (dt.time(6, 0), 720, {"hour": 18, "minute": 0}),
    ],
)
def test_cron_fields(window: dt.time, lead: int, fields: dict[str, int]) -> None:
    assert schedule.cron_fields(window, lead) == fields


def _next_fires(scheduler: Any, now: dt.datetime) -> dict[str, dt.datetime]:
    return {job.id: job.trigger.get_next_fire_time(None, now) for job in scheduler.get_jobs()}


def test_the_scheduler_fires_at_the_same_times_as_the_rule() -> None:
    scheduler = schedule.build_scheduler(DEFAULT, 60, 0, _ignore)
    now = at("2026-12-01 03:17")
    fires = _next_fires(scheduler, now)
    assert fires == {"window-0000": at("2026-12-01 23:00"), "window-1200": at("2026-12-01 11:00")}
    assert min(fires.values()) == schedule.fire_times(now, DEFAULT, 60, 1)[0]
    for job in scheduler.get_jobs():
        assert job.coalesce is True
        assert job.max_instances == 1
        assert job.misfire_grace_time == schedule.MISFIRE_GRACE_S
        assert job.args == ("window",)


def test_the_interval_job_fires_on_epoch_boundaries() -> None:
    scheduler = schedule.build_scheduler(DEFAULT, 60, 20, _ignore)
    fires = _next_fires(scheduler, at("2026-12-01 03:17:05"))
    assert fires["interval"] == at("2026-12-01 03:20")
    interval = next(j for j in scheduler.get_jobs() if j.id == "interval")
    assert interval.args == ("interval",)


async def test_a_fire_asks_for_the_slot_its_clock_says() -> None:
    env = {"SYNCD_DATABASE_URL": "postgresql://u@localhost/db", "SYNCD_INTERVAL_MINUTES": "15"}
    settings = Settings.from_env(env, need_criteo=False)
    # A cron fire a hair after 11:00 (window 12:00, lead 60): it targets 12:00.
    runtime: Any = SimpleNamespace(settings=settings)
    service = Service(runtime, clock=lambda: at("2026-12-01 11:00:00.2"))
    await service.fire("window")
    await service.fire("interval")
    assert service._pending == {
        "window": Slot("window", at("2026-12-01 12:00"), at("2026-12-01 12:00")),
        "interval": Slot("interval", at("2026-12-01 11:00"), at("2026-12-01 12:00")),
    }
    assert service.seconds_to_next_window() == 3599.8


async def _no_verify() -> None:
    return None


def test_verification_jobs_fire_hours_after_each_window() -> None:
    scheduler = schedule.build_scheduler(
        DEFAULT, 60, 0, _ignore, verify=_no_verify, verify_after_hours=5.5
    )
    fires = _next_fires(scheduler, at("2026-12-01 03:17"))
    assert fires["verify-0000"] == at("2026-12-01 05:30")
    assert fires["verify-1200"] == at("2026-12-01 17:30")
    off = schedule.build_scheduler(DEFAULT, 60, 0, _ignore, verify=_no_verify)
    assert {job.id for job in off.get_jobs()} == {"window-0000", "window-1200"}


def test_the_window_verified_is_the_last_one_at_or_before_the_clock() -> None:
    assert schedule.last_window(at("2026-12-01 17:00"), DEFAULT) == at("2026-12-01 12:00")
    assert schedule.last_window(at("2026-12-01 12:00"), DEFAULT) == at("2026-12-01 12:00")
    assert schedule.last_window(at("2026-12-01 05:00"), DEFAULT) == at("2026-12-01 00:00")
    assert schedule.last_window(at("2026-12-01 05:00"), (dt.time(6, 0),)) == at("2026-11-30 06:00")
