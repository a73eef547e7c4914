"""`syncd resync KEY`: rebuild a segment's list on Criteo from the truth.

The truth is the mirror relation for a mirror link, the ledger (what Criteo acknowledged,
with the chunks still on their way) for a change-log link. A resync is two plans queued in
one transaction: a clear (clear.py), then every member as adds. Plans of a segment go out
in order, so a crash anywhere resumes exactly where it stopped: the clear is sent again
until acknowledged, then the adds. Nothing is sent here: the next `syncd sync` or daemon
run pushes them.

Criteo computes audiences at the windows: a list cleared and not yet re-added at a window
would make an empty audience for 12 hours. So a resync is refused when the next window is
closer than SYNCD_RESYNC_MIN_HOURS, unless forced; and one that would leave far fewer
members than Criteo has now (an empty mirror source) is refused like the removal guard
would block it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from syncd import clear, guard, ledger, mirror, plan
from syncd.config import Settings
from syncd.daemon.schedule import next_window
from syncd.db import query
from syncd.errors import UsageError


@dataclass(frozen=True)
class Resync:
    segment_key: str
    clear_plan_id: int
    members_before: int  # what Criteo has of the target, as syncd knows it
    adds: int
    chunks: int
    next_window: dt.datetime
    hours_left: float


async def queue(
    conn: Any, settings: Settings, segment_key: str, *, force: bool = False, now: dt.datetime
) -> Resync:
    """Queue KEY's resync (UsageError when refused, nothing queued)."""
    window = next_window(now, settings.windows_utc)
    hours_left = (window - now).total_seconds() / 3600
    if hours_left < settings.resync_min_hours and not force:
        raise UsageError(
            f"resync of {segment_key!r} refused: the next window is {window:%H:%M} UTC, "
            f"{hours_left:.1f} h away (SYNCD_RESYNC_MIN_HOURS {settings.resync_min_hours:g}); "
            "a resync clears the list before re-adding it, and Criteo must not compute the "
            "audience from a list half rebuilt. Run it after the window, or with --force"
        )
    await ledger.fold(conn)  # the truth of a change-log link is the ledger, whole
    async with plan.plan_locks(conn, segment_key), conn.transaction(isolation="repeatable_read"):
        link = await conn.fetchrow(query("lock_link_for_plan"), segment_key)
        if link is None:
            raise UsageError(f"{segment_key!r} is not linked")
        members = int(
            await conn.fetchval(query("target_size"), link["api"], link["criteo_segment_id"])
        )
        # The members first, from what Criteo has now: the clear queued next would hide
        # the ledger from target_members.
        await conn.execute(query("plan_work_mem"))
        if link["mirror_relation"] is not None:
            found = await mirror.fill_net(conn, None, None, link, rebuild=True)
            read = found["rows_read"]
        else:
            await conn.execute(query("plan_net_table"))
            await conn.execute(query("rebuild_from_ledger"), link["api"], link["criteo_segment_id"])
            read = members
        clear_plan = await clear.queue_clear(conn, None, link)
        plan_id = await conn.fetchval(query("create_plan"), None, segment_key)
        written = await mirror.chunk_net(conn, plan_id, link, settings.chunk_size)
        adds, chunks = written["adds"], written["chunks"]
        await conn.execute(
            query("record_plan"), plan_id, read, 0, adds, 0, chunks, written["suppressed"]
        )
        if guard.over_limit(members - adds, members, settings.max_remove_fraction) and not force:
            raise UsageError(  # rolls back: nothing queued
                f"resync of {segment_key!r} refused: it would leave {adds:,} of the "
                f"{members:,} members Criteo has, more removals than SYNCD_MAX_REMOVE_FRACTION "
                f"({settings.max_remove_fraction:g}) allows; check the source, or --force"
            )
    return Resync(segment_key, clear_plan, members, adds, chunks, window, hours_left)


def said(done: Resync) -> str:
    return (
        f"resync of {done.segment_key} queued: a clear, then {done.adds:,} member(s) in "
        f"{done.chunks} chunk(s) (Criteo has {done.members_before:,} now, as syncd knows it); "
        "they go out in that order with the next `syncd sync` or daemon run (next window "
        f"{done.next_window:%Y-%m-%d %H:%M} UTC, {done.hours_left:.1f} h away)"
    )
