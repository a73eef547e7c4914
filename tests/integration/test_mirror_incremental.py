"""Incremental mirror diffs (sql/0017_mirror_rows.sql): a sync normalises and nets only the
source rows that changed since the last one, and falls back to a full diff whenever what
Criteo has may differ from what the rows say (a forget, consent given again, another key on
the same Criteo segment, a resync, a day gone by)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from syncd import links, privacy, resync
from syncd.sandbox import RunningSandbox
from syncd.sync import sync_once
from tests.helpers import members, sha256
from tests.integration.test_mirror import hashed, mirror_synced
from tests.integration.test_push import with_env


async def full_at(conn: Any) -> Any:
    return await conn.fetchval("SELECT full_at FROM syncd.mirror_state WHERE segment_key = 'vip'")


async def test_changes_are_diffed_incrementally_and_exactly(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    conn = crm
    settings = with_env(env, SYNCD_CHUNK_SIZE="40")
    await mirror_synced(conn, sandbox, settings, 1, 100)
    first_full = await full_at(conn)
    steps = [
        # gone, new, a member spelled another way (the same member), duplicates, bad rows
        "DELETE FROM crm.members WHERE identifier LIKE 'User1_@%'",
        "INSERT INTO crm.members SELECT 'vip', 'User' || g || '@Example.com ' "
        "FROM generate_series(101, 130) g",
        "UPDATE crm.members SET identifier = lower(trim(identifier)) "
        "WHERE identifier LIKE 'User2_@%'",
        "INSERT INTO crm.members VALUES ('vip', 'user5@example.com'), ('vip', 'nope'), "
        "('vip', NULL), ('vip', 'User131@Example.com'), ('vip', 'User131@Example.com')",
        "DELETE FROM crm.members WHERE identifier = 'User5@Example.com '",  # still spelled once
        "DELETE FROM crm.members WHERE identifier IN ('user5@example.com', 'nope')",
    ]
    expected = hashed(1, 100)
    expected -= {sha256(f"user{n}@example.com") for n in range(10, 20)}
    for n, step in enumerate(steps):
        await conn.execute(step)
        assert (await sync_once(settings)).exit_code == 0, step
        if n == 1:
            expected |= hashed(101, 130)
        if n == 3:
            expected |= {sha256("user131@example.com")}
        if n == 5:
            expected -= {sha256("user5@example.com")}
        assert members(sandbox, "1000") == expected, step
    assert await full_at(conn) == first_full  # every one of them incremental
    rows = await conn.fetchval("SELECT count(*) FROM syncd.mirror_rows")
    assert rows == await conn.fetchval("SELECT count(DISTINCT identifier) FROM crm.members")


async def test_consent_given_again_is_seen_by_the_next_diff(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    conn = crm
    settings = with_env(env)
    await mirror_synced(conn, sandbox, settings, 1, 10)
    await privacy.forget(conn, "user3@example.com", "email", settings.chunk_size)
    assert (await sync_once(settings)).exit_code == 0
    assert members(sandbox, "1000") == hashed(1, 10) - {sha256("user3@example.com")}
    assert (await sync_once(settings)).chunks_planned == 0  # incremental: nothing changed
    await privacy.remove_suppression(conn, "user3@example.com", "email")
    assert (await sync_once(settings)).exit_code == 0
    assert members(sandbox, "1000") == hashed(1, 10)


async def test_a_full_diff_when_the_target_changed_behind_the_rows(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    conn = crm
    settings = with_env(env)
    await mirror_synced(conn, sandbox, settings, 1, 10)
    # Another key linked to the same Criteo segment removes a member the mirror lists.
    await links.link(conn, links.Link("crm_log", "1000", "email", account_id="42"))
    await conn.execute(
        "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
        "VALUES ('crm_log', 'user4@example.com', 'remove')"
    )
    assert (await sync_once(settings)).exit_code == 0
    assert (await sync_once(settings)).exit_code == 0  # the mirror adds it back: full diff
    assert members(sandbox, "1000") == hashed(1, 10)
    await links.unlink(conn, "crm_log")

    # A day later the diff is full again, whatever happened.
    sandbox.state.segments["1000"].members.discard(sha256("user5@example.com"))
    await conn.execute("DELETE FROM syncd.ledger WHERE identifier = syncd.ledger_pack($1)",
                       sha256("user5@example.com"))  # fmt: skip
    assert (await sync_once(settings)).chunks_planned == 0  # incremental: not seen
    await conn.execute("UPDATE syncd.mirror_state SET full_at = now() - interval '21 hours'")
    assert (await sync_once(settings)).exit_code == 0
    assert members(sandbox, "1000") == hashed(1, 10)

    # A resync queues plans the rows do not know of: the diff after it is full.
    await resync.queue(conn, settings, "vip", force=True, now=dt.datetime.now(dt.UTC))
    assert (await sync_once(settings)).exit_code == 0
    assert members(sandbox, "1000") == hashed(1, 10)
    assert await full_at(conn) is not None


async def test_a_forget_then_consent_again_before_the_next_diff_is_seen(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """The suppressions look as before (one added, one removed), but the forget's remove
    plan went to the segment: the next diff is full and adds the member back."""
    conn = crm
    settings = with_env(env)
    await mirror_synced(conn, sandbox, settings, 1, 10)
    await privacy.forget(conn, "user3@example.com", "email", settings.chunk_size)
    await privacy.remove_suppression(conn, "user3@example.com", "email")
    assert (await sync_once(settings)).exit_code == 0  # pushes the forget's remove
    assert (await sync_once(settings)).exit_code == 0
    assert members(sandbox, "1000") == hashed(1, 10)
