"""Post-window verification: Criteo's count of each linked list against the ledger's."""

from __future__ import annotations

import datetime as dt
from typing import Any

from structlog.testing import capture_logs

from syncd import report, status
from syncd.config import Settings
from syncd.daemon.service import Service
from syncd.runtime import Runtime
from syncd.sandbox import RunningSandbox
from syncd.sync import run_sync
from syncd.verify import diverged, verify_window
from tests.helpers import insert_generated_changes, link_in_process

WINDOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def test_diverged_is_relative_to_what_syncd_acknowledged() -> None:
    assert not diverged(98, 100, 0.02) and diverged(97, 100, 0.02)
    assert not diverged(0, 0, 0.02) and diverged(5, 0, 0.02)


async def test_a_verification_flags_a_list_that_diverged(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """vip and club are synced; Criteo then loses 10 of club's 100 members: vip is
    verified, club diverged, and status shows both; a second replica verifies nothing."""
    settings = Settings.from_env({**env, "SYNCD_CHUNK_SIZE": "40"})
    for key, criteo_id in (("vip", "1001"), ("club", "1002")):
        await link_in_process(conn, sandbox, key, criteo_id)
        await insert_generated_changes(conn, key, 100)
    async with Runtime.open(settings) as runtime:
        assert (await run_sync(runtime)).exit_code == 0
        club = sandbox.state.segments["1002"].members
        for member in sorted(club)[:10]:
            club.discard(member)
        # A third link whose segment Criteo no longer knows: said, and the others go on.
        await conn.execute(
            "INSERT INTO syncd.segments (segment_key, api, criteo_segment_id, identifier_type, "
            "account_id) VALUES ('gone', 'retail-media', '999', 'email', '42')"
        )
        with capture_logs() as logs:
            readings = await verify_window(runtime, WINDOW)
        assert readings is not None and len(readings) == 3
        assert await verify_window(runtime, WINDOW) is None  # another replica had it
    events = {e["segment_key"]: e for e in logs if e["event"].startswith("segment_")}
    assert events["gone"]["event"] == "segment_stats_failed"
    assert events["gone"]["error_code"] == "segment-not-found"
    assert events["vip"]["event"] == "segment_verified"
    assert (events["vip"]["criteo_identifiers"], events["vip"]["acknowledged"]) == (100, 100)
    assert events["club"]["event"] == "segment_diverged"
    assert events["club"]["log_level"] == "warning"
    assert (events["club"]["criteo_identifiers"], events["club"]["difference"]) == (90, -10)
    text = report.status_text(await status.read(conn))
    assert "last verification per segment:" in text
    club_line = next(line for line in text.splitlines() if line.startswith("club "))
    assert club_line.split()[-3:] == ["90", "100", "-10"]


async def test_the_daemons_job_verifies_the_window_its_hours_are_after(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    # 0.02 h is 1.2 min; the job fires on whole minutes (12:01): the window it verifies is
    # still 12:00 that day, not the day before (seen by hand with a window 2 minutes ahead).
    settings = Settings.from_env({**env, "SYNCD_VERIFY_AFTER_HOURS": "0.02"})
    await link_in_process(conn, sandbox, "vip", "1001")
    clock = dt.datetime(2026, 12, 1, 12, 1, tzinfo=dt.UTC)
    async with Runtime.open(settings) as runtime:
        await Service(runtime, clock=lambda: clock).verify()
    windows = await conn.fetch("SELECT window_at FROM syncd.verifications")
    assert [r["window_at"] for r in windows] == [WINDOW]
    row = await conn.fetchrow("SELECT verified_window, acknowledged FROM syncd.segment_stats")
    assert (row["verified_window"], row["acknowledged"]) == (WINDOW, 0)
