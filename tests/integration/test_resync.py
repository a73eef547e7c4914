"""`syncd resync`: a segment's list on Criteo rebuilt from the truth (the mirror relation, or
the ledger of a change-log link) as a clear then every member, in the outbox, never close
to a window."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from syncd import ledger, links, resync
from syncd.errors import UsageError
from syncd.sandbox import RunningSandbox
from syncd.sync import sync_once
from tests.helpers import insert_generated_changes, members, sha256
from tests.integration.test_mirror import hashed, mirror_synced
from tests.integration.test_push import with_env

# 06:00 UTC with windows at 00:00 and 12:00: the next window is 6 h away.
MORNING = dt.datetime(2026, 12, 1, 6, 0, tzinfo=dt.UTC)


async def operations(conn: Any, run_id: int) -> list[tuple[str, int]]:
    """What a run sent, in the order Criteo acknowledged it."""
    rows = await conn.fetch(
        "SELECT operation, identifiers_sent FROM syncd.push_audit WHERE run_id = $1 "
        "AND outcome = 'acknowledged' ORDER BY finished_at, id",
        run_id,
    )
    return [(r["operation"], r["identifiers_sent"]) for r in rows]


async def test_a_mirror_resync_clears_then_re_adds_its_source(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    conn = crm
    settings = with_env(env, SYNCD_CHUNK_SIZE="100")
    await mirror_synced(conn, sandbox, settings, 1, 250)
    # The list drifted on Criteo's side (someone edited it in the UI, say).
    sandbox.state.segments["1000"].members.update({"stranger", sha256("x@example.com")})
    sandbox.state.segments["1000"].members.discard(sha256("user7@example.com"))

    queued = await resync.queue(conn, settings, "vip", now=MORNING)
    assert (queued.members_before, queued.adds, queued.chunks) == (250, 250, 3)
    assert "a clear, then 250 member(s) in 3 chunk(s)" in resync.said(queued)
    summary = await sync_once(settings)
    assert summary.exit_code == 0
    assert members(sandbox, "1000") == hashed(1, 250)
    sent = await operations(conn, summary.run_id)
    assert sent[0] == ("clear", 0) and sorted(sent[1:]) == [("add", 50), ("add", 100), ("add", 100)]
    await ledger.fold(conn)
    assert await conn.fetchval("SELECT count(*) FROM syncd.ledger") == 250
    assert (await sync_once(settings)).chunks_planned == 0  # nothing left to send


async def test_a_change_log_resync_rebuilds_from_the_ledger(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    settings = with_env(env, SYNCD_CHUNK_SIZE="100")
    sandbox.state.add_segment("retail-media", "42", "email", segment_id="1000")
    await links.link(conn, links.Link("s0", "1000", "email", account_id="42"))
    await insert_generated_changes(conn, "s0", 150)
    assert (await sync_once(settings)).exit_code == 0
    acknowledged = members(sandbox, "1000")
    sandbox.state.segments["1000"].members.clear()  # emptied by hand on Criteo's side

    queued = await resync.queue(conn, settings, "s0", now=MORNING)
    assert (queued.members_before, queued.adds) == (150, 150)
    # A change planned after the resync goes after it.
    await insert_generated_changes(conn, "s0", 1, "remove")
    assert (await sync_once(settings)).exit_code == 0
    assert members(sandbox, "1000") == acknowledged - {sha256("user1@example.com")}


async def test_a_resync_is_refused_close_to_a_window_unless_forced(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    conn = crm
    settings = with_env(env, SYNCD_WINDOWS_UTC="08:00,20:00")  # 2 h after MORNING
    await mirror_synced(conn, sandbox, settings, 1, 10)
    with pytest.raises(UsageError, match=r"next window is 08:00 UTC, 2\.0 h away"):
        await resync.queue(conn, settings, "vip", now=MORNING)
    assert await conn.fetchval("SELECT count(*) FROM syncd.chunks WHERE state <> 'done'") == 0
    forced = await resync.queue(conn, settings, "vip", force=True, now=MORNING)
    assert forced.adds == 10
    assert (await sync_once(settings)).exit_code == 0
    assert members(sandbox, "1000") == hashed(1, 10)


async def test_a_resync_that_would_leave_few_members_is_refused(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    conn = crm
    settings = with_env(env)
    await mirror_synced(conn, sandbox, settings, 1, 10)
    await conn.execute("TRUNCATE crm.members")
    with pytest.raises(UsageError, match="it would leave 0 of the 10 members"):
        await resync.queue(conn, settings, "vip", now=MORNING)
    assert await conn.fetchval("SELECT count(*) FROM syncd.chunks WHERE state <> 'done'") == 0
    with pytest.raises(UsageError, match="'nope' is not linked"):
        await resync.queue(conn, settings, "nope", now=MORNING)
