"""What `syncd status` reads: recent runs, open, failed and unsendable chunks, waiting
changes. The queries are in db/queries/status.sql; report.status_text formats the result."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from syncd.config import DEFAULT_WINDOWS
from syncd.daemon.schedule import next_window
from syncd.db import query
from syncd.runtime import DEFAULT_APP

FAILED_CHUNKS_SHOWN = 20
MISSED_WINDOWS_DAYS = 30
MISSED_WINDOWS_SHOWN = 10


@dataclass
class Status:
    runs_asked: int
    recent_runs: list[Any] = field(default_factory=list)
    open_chunks: list[Any] = field(default_factory=list)
    failed_chunks: list[Any] = field(default_factory=list)
    unsendable_chunks: list[Any] = field(default_factory=list)
    waiting_linked: int = 0
    waiting_unlinked: list[Any] = field(default_factory=list)
    # Window accounting (SYNCD_WINDOWS_UTC): the next window, when status was read, and
    # the recent windows no run made.
    next_window: dt.datetime | None = None
    now: dt.datetime | None = None
    missed_windows: list[Any] = field(default_factory=list)
    budgets: list[Any] = field(default_factory=list)  # each Criteo app's call budget
    # Open chunks of an app no longer configured: no run can send them.
    unknown_app_chunks: list[Any] = field(default_factory=list)
    # Criteo called the configured API version deprecated in the latest run: its sunset.
    api_notice: Any = None
    # Each segment's latest post-window verification (Criteo's count against syncd's).
    verifications: list[Any] = field(default_factory=list)
    # Segments the mass-removal guard blocked; inbox changes waiting on a mirror-linked key.
    blocked: list[Any] = field(default_factory=list)
    waiting_mirrored: list[Any] = field(default_factory=list)
    # Consent withdrawals waiting for a run, and those refused lately (without values).
    consent: list[Any] = field(default_factory=list)


async def read(
    conn: Any,
    runs: int = 5,
    windows: Sequence[dt.time] = DEFAULT_WINDOWS,
    apps: Sequence[str] = (DEFAULT_APP,),
) -> Status:
    now = dt.datetime.now(dt.UTC)
    return Status(
        runs_asked=runs,
        recent_runs=list(await conn.fetch(query("recent_runs"), runs)) if runs else [],
        open_chunks=list(await conn.fetch(query("open_chunks_summary"))),
        failed_chunks=list(await conn.fetch(query("failed_chunks"), FAILED_CHUNKS_SHOWN)),
        unsendable_chunks=list(await conn.fetch(query("unsendable_chunks"))),
        unknown_app_chunks=list(await conn.fetch(query("chunks_of_unknown_apps"), list(apps))),
        waiting_linked=await conn.fetchval(query("waiting_linked")),
        waiting_unlinked=list(await conn.fetch(query("waiting_unlinked"))),
        next_window=next_window(now, windows),
        now=now,
        missed_windows=list(
            await conn.fetch(query("missed_windows"), MISSED_WINDOWS_DAYS, MISSED_WINDOWS_SHOWN)
        ),
        budgets=list(await conn.fetch(query("budget_use"))),
        api_notice=await conn.fetchrow(query("api_notice")),
        verifications=list(await conn.fetch(query("last_verifications"))),
        blocked=list(await conn.fetch(query("blocked_segments"))),
        waiting_mirrored=list(await conn.fetch(query("waiting_mirrored"))),
        consent=list(await conn.fetch(query("consent_status"), MISSED_WINDOWS_DAYS)),
    )


async def last_finished_run(conn: Any) -> Any:
    """The latest run that ended on its own (succeeded, failed, crashed), or None."""
    return await conn.fetchrow(query("last_finished_run"))
