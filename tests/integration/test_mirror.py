"""Mirror links: a segment's membership diffed from a CRM relation against the ledger, and the
mass-removal guard that stops a truncated source (or a CRM bug) from emptying a live list."""

from __future__ import annotations

import re
from typing import Any

import pytest

from syncd import guard, links, mirror, plan
from syncd.config import Settings
from syncd.errors import SyncdError, UsageError
from syncd.sandbox import RunningSandbox
from syncd.sync import sync_once
from tests.helpers import control, insert_changes, insert_generated_changes, members, sha256
from tests.integration.test_push import with_env


async def mirror_of(
    conn: Any, sandbox: RunningSandbox, key: str, criteo_id: str, relation: str = "crm.members"
) -> None:
    """A Retail Media email segment in the sandbox, linked as a mirror of `relation`."""
    sandbox.state.add_segment("retail-media", "42", "email", segment_id=criteo_id)
    await links.link(conn, links.Link(key, criteo_id, "email", account_id="42", mirror=relation))


async def source(conn: Any, key: str, first: int, last: int) -> None:
    """The CRM's desired membership of `key`: user<first..last>@example.com, and nobody else."""
    await conn.execute("DELETE FROM crm.members WHERE segment_key = $1", key)
    await conn.execute(
        "INSERT INTO crm.members (segment_key, identifier) "
        "SELECT $1, 'User' || g || '@Example.com ' FROM generate_series($2::int, $3::int) g",
        key,
        first,
        last,
    )


async def mirror_synced(
    conn: Any, sandbox: RunningSandbox, settings: Settings, first: int, last: int
) -> None:
    """Segment 1000 mirrors key vip of crm.members, which holds user<first..last>, synced."""
    await mirror_of(conn, sandbox, "vip", "1000")
    await source(conn, "vip", first, last)
    assert (await sync_once(settings)).exit_code == 0


def hashed(first: int, last: int) -> set[str]:
    return {sha256(f"user{n}@example.com") for n in range(first, last + 1)}


async def requests_made(conn: Any) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM syncd.push_audit"))


async def test_a_mirror_follows_its_source_and_sends_only_the_difference(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    conn = crm
    settings = with_env(env, SYNCD_CHUNK_SIZE="100")
    await mirror_of(conn, sandbox, "vip", "1000")
    await source(conn, "vip", 1, 250)

    first = await sync_once(settings)
    assert first.exit_code == 0
    assert members(sandbox, "1000") == hashed(1, 250)
    ops = await conn.fetch("SELECT DISTINCT operation FROM syncd.push_audit")
    assert [r["operation"] for r in ops] == ["add"]  # a first sync only adds: no clear

    await source(conn, "vip", 51, 300)  # 50 leave, 50 join: 5 % of the source each way
    before = await requests_made(conn)
    second = await sync_once(settings)
    assert second.exit_code == 0
    assert members(sandbox, "1000") == hashed(51, 300)
    sent = await conn.fetch(
        "SELECT operation, sum(identifiers_sent) AS n FROM syncd.push_audit "
        "WHERE run_id = $1 GROUP BY 1 ORDER BY 1",
        second.run_id,
    )
    assert [(r["operation"], r["n"]) for r in sent] == [("add", 50), ("remove", 50)]
    assert await requests_made(conn) == before + 2

    third = await sync_once(settings)
    assert third.exit_code == 0
    assert await requests_made(conn) == before + 2  # nothing changed, nothing sent
    assert members(sandbox, "1000") == hashed(51, 300)


async def test_a_truncated_source_is_blocked_until_approved(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    conn = crm
    settings = with_env(env)
    await mirror_synced(conn, sandbox, settings, 1, 100)
    sent = await requests_made(conn)

    await conn.execute("TRUNCATE crm.members")
    blocked = await sync_once(settings)
    assert blocked.exit_code == 1
    assert blocked.plans_blocked == 1
    assert "blocked by the mass-removal guard (vip)" in (blocked.error or "")
    assert await requests_made(conn) == sent  # nothing of it went
    assert members(sandbox, "1000") == hashed(1, 100)
    link = await conn.fetchrow("SELECT * FROM syncd.segments WHERE segment_key = 'vip'")
    assert (link["blocked_removes"], link["blocked_members"]) == (100, 100)
    assert await conn.fetchval("SELECT count(*) FROM syncd.chunks WHERE state <> 'done'") == 0
    [preview] = await plan.preview(conn, settings.chunk_size, settings.max_remove_fraction)
    assert preview.block is not None and preview.removes == 100

    assert await guard.approve(conn, "vip") == (100, 100)
    approved = await sync_once(settings)
    assert approved.exit_code == 0
    assert members(sandbox, "1000") == set()
    link = await conn.fetchrow("SELECT * FROM syncd.segments WHERE segment_key = 'vip'")
    assert (link["blocked_at"], link["removals_approved"]) == (None, False)  # used up
    with pytest.raises(UsageError, match="has no blocked plan"):
        await guard.approve(conn, "vip")


async def test_a_source_filled_again_needs_no_approval(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    conn = crm
    settings = with_env(env)
    await mirror_synced(conn, sandbox, settings, 1, 100)
    await source(conn, "vip", 1, 40)  # 60 % gone: a broken view, say
    assert (await sync_once(settings)).exit_code == 1
    await source(conn, "vip", 1, 90)  # fixed: 10 % gone is within the guard
    assert (await sync_once(settings)).exit_code == 0
    assert members(sandbox, "1000") == hashed(1, 90)
    assert await conn.fetchval("SELECT blocked_at FROM syncd.segments") is None


async def test_the_guard_is_off_at_fraction_1(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    conn = crm
    settings = with_env(env, SYNCD_MAX_REMOVE_FRACTION="1")
    await mirror_synced(conn, sandbox, settings, 1, 10)
    await conn.execute("TRUNCATE crm.members")
    assert (await sync_once(settings)).exit_code == 0
    assert members(sandbox, "1000") == set()


async def test_a_change_log_that_removes_most_members_is_blocked_and_its_changes_wait(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    settings = with_env(env)
    sandbox.state.add_segment("retail-media", "42", "email", segment_id="1000")
    await links.link(conn, links.Link("s0", "1000", "email", account_id="42"))
    await insert_generated_changes(conn, "s0", 100)
    assert (await sync_once(settings)).exit_code == 0
    await insert_generated_changes(conn, "s0", 60, "remove")  # a CRM bug, say
    summary = await sync_once(settings)
    assert (summary.exit_code, summary.plans_blocked) == (1, 1)
    assert len(members(sandbox, "1000")) == 100
    assert await conn.fetchval("SELECT count(*) FROM syncd.membership_changes") == 60

    await guard.approve(conn, "s0")
    assert (await sync_once(settings)).exit_code == 0
    assert len(members(sandbox, "1000")) == 40


async def test_removes_of_values_criteo_never_had_are_not_counted_by_the_guard(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    sandbox.state.add_segment("retail-media", "42", "email", segment_id="1000")
    await links.link(conn, links.Link("s0", "1000", "email", account_id="42"))
    await insert_generated_changes(conn, "s0", 10)
    assert (await sync_once(with_env(env))).exit_code == 0
    # 500 removes, of which 2 hit members: a CRM cleaning up addresses it never sent.
    await insert_generated_changes(conn, "s0", 500, "remove", first=9)
    assert (await sync_once(with_env(env))).exit_code == 0
    assert len(members(sandbox, "1000")) == 8


async def test_a_dropped_view_fails_its_segment_by_name_and_removes_nobody(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    conn = crm
    settings = with_env(env)
    await conn.execute("CREATE VIEW crm.vip_view AS SELECT * FROM crm.members")
    await mirror_of(conn, sandbox, "vip", "1000", relation="crm.vip_view")
    await mirror_of(conn, sandbox, "other", "1001")
    await source(conn, "vip", 1, 20)
    await source(conn, "other", 1, 5)
    assert (await sync_once(settings)).exit_code == 0

    await conn.execute("DROP VIEW crm.vip_view")
    await source(conn, "other", 1, 6)
    summary = await sync_once(settings)
    assert summary.exit_code == 1
    assert summary.plans_failed == 1
    assert "vip" in (summary.error or "")
    assert members(sandbox, "1000") == hashed(1, 20)  # never counted as empty
    assert members(sandbox, "1001") == hashed(1, 6)  # the other segment went on
    link = await conn.fetchrow("SELECT * FROM syncd.segments WHERE segment_key = 'vip'")
    said = re.escape("mirror source of 'vip': relation crm.vip_view does not exist")
    with pytest.raises(SyncdError, match=said):
        async with conn.transaction():
            await mirror.diff(conn, summary.run_id, 0, link, 100)


async def test_linking_checks_the_relation(crm: Any) -> None:
    conn = crm
    await conn.execute("CREATE TABLE crm.wrong (segment_key text, email text)")
    await conn.execute("CREATE TABLE crm.typed (segment_key text, identifier integer)")
    cases = {
        "crm.nothing": "relation crm.nothing does not exist",
        "crm.wrong": "crm.wrong has no column identifier",
        "crm.typed": "crm.typed.identifier is integer, not text",
        "a.b.c.d": "is not a relation name",
    }
    for relation, message in cases.items():
        with pytest.raises(UsageError, match=message):
            await links.link(conn, links.Link("k", "1", "email", mirror=relation))
    outcome = await links.link(conn, links.Link("k", "1", "email", mirror="crm.members"))
    assert outcome.link.mirror == "crm.members"
    assert "mirroring crm.members" in outcome.summary


async def test_inbox_changes_of_a_mirror_key_wait_and_bad_rows_are_recorded_once(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    conn = crm
    await mirror_of(conn, sandbox, "vip", "1000")
    await source(conn, "vip", 1, 3)
    await conn.execute(
        "INSERT INTO crm.members VALUES ('vip', 'not an email'), ('vip', NULL), ('vip', '')"
    )
    await insert_changes(conn, [("vip", "late@example.com", "add")])
    for _ in range(2):
        assert (await sync_once(with_env(env))).exit_code == 0
    assert members(sandbox, "1000") == hashed(1, 3)
    assert await conn.fetchval("SELECT count(*) FROM syncd.membership_changes") == 1
    reasons = await conn.fetch(
        "SELECT reason FROM syncd.rejected_identifiers WHERE segment_key = 'vip' ORDER BY 1"
    )
    assert [r["reason"] for r in reasons] == ["contains_whitespace", "empty", "empty"]


async def test_a_diff_starts_from_the_chunks_still_on_their_way_not_only_the_ledger(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """A plan whose chunks Criteo refused (kept for the next run) is still what Criteo will
    have: the next diff overlays it on the ledger, so it neither repeats nor misses it."""
    conn = crm
    settings = with_env(env, SYNCD_CHUNK_SIZE="10")
    await mirror_of(conn, sandbox, "vip", "1000")
    await source(conn, "vip", 1, 20)
    await control(sandbox, "POST", "faults", {"script": [{"status": 400}] * 2})
    assert (await sync_once(settings)).exit_code == 1  # both chunks refused, kept
    assert members(sandbox, "1000") == set()

    await source(conn, "vip", 6, 20)  # 5 leave before their add ever landed
    summary = await sync_once(settings)
    assert summary.exit_code == 0
    assert members(sandbox, "1000") == hashed(6, 20)
    # The second plan removed the 5 (the first plan's adds go first) and added nobody twice.
    sent = await conn.fetch(
        "SELECT c.operation, sum(c.identifier_count) AS n FROM syncd.chunks c "
        "WHERE c.plan_id = (SELECT max(plan_id) FROM syncd.chunks) GROUP BY 1"
    )
    assert [(r["operation"], r["n"]) for r in sent] == [("remove", 5)]
