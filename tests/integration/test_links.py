"""Segment links against a real database: link changes while plans run, per-chunk
targets, re-pointing, unlinking, and what `validate` refuses."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from syncd import links, plan, report, status
from syncd.config import Settings
from syncd.db import create_pool, query
from syncd.db import migrations as db
from syncd.errors import UsageError
from syncd.sandbox import RunningSandbox
from syncd.sync import sync_once
from tests.helpers import insert_changes


async def new_run(conn: Any) -> int:
    return int(
        await conn.fetchval(
            "INSERT INTO syncd.sync_runs (host, pid, target_window) "
            "VALUES ('t', 1, now()) RETURNING id"
        )
    )


async def plan_everything(settings: Settings, run_id: int) -> None:
    pool = await create_pool(settings)
    try:

        async def planned(_: Any) -> None:
            return None

        await plan.plan_all(pool, run_id, 50_000, 2, planned)
    finally:
        await pool.close()


async def orphans(conn: Any) -> int:
    """Open chunks whose key has no link, or whose link has another identifier type."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM syncd.chunks c WHERE c.state <> 'done' AND NOT EXISTS ("
            "SELECT 1 FROM syncd.segments s WHERE s.segment_key = c.segment_key "
            "AND s.identifier_type = c.identifier_type)"
        )
    )


async def blocked_or_done(conn: Any, task: asyncio.Task[Any], pid: int) -> bool:
    """Wait until `task` (running on backend `pid`) has finished or waits for a lock.
    Either happens; which one is what the test looks at (no timing involved)."""
    while not task.done():
        waiting = await conn.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        )
        if waiting:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize("force", [True, False])
async def test_unlink_during_a_plan_waits_for_it_and_leaves_no_orphan(
    conn: Any, database_url: str, settings: Settings, monkeypatch: Any, force: bool
) -> None:
    """Defect 1: an unlink that comes while a plan is writing the key's chunks waits for
    the plan, then sees its chunks (refused, or dropped with --force): no chunk is ever
    left open for a key that has no link."""
    await links.link(conn, links.Link("vip", "1", "email"))
    await insert_changes(conn, [("vip", "a@x.com", "add"), ("vip", "b@x.com", "remove")])
    other = await asyncpg.connect(database_url)
    real_plan = plan._plan
    seen: dict[str, Any] = {}

    async def plan_then_unlink(*args: Any) -> Any:
        result = await real_plan(*args)
        task = asyncio.ensure_future(links.unlink(other, "vip", force=force))
        seen["blocked"] = await blocked_or_done(conn, task, other.get_server_pid())
        seen["task"] = task
        return result

    monkeypatch.setattr(plan, "_plan", plan_then_unlink)
    try:
        await plan_everything(settings, await new_run(conn))
        unlink: asyncio.Task[int] = seen["task"]
        if force:
            assert await unlink == 2  # the plan's two chunks, dropped with the link
        else:
            with pytest.raises(UsageError, match="2 chunk"):
                await unlink
    finally:
        await other.close()
    assert seen["blocked"], "the unlink did not wait for the plan holding the link"
    assert await orphans(conn) == 0
    linked = await conn.fetchval("SELECT count(*) FROM syncd.segments")
    chunks = await conn.fetchval("SELECT count(*) FROM syncd.chunks")
    assert (linked, chunks) == ((0, 0) if force else (1, 2))


@pytest.mark.parametrize("change", ["unlink", "relink as phoneNumber"])
async def test_plan_reads_the_link_inside_its_transaction(
    conn: Any, database_url: str, settings: Settings, monkeypatch: Any, change: str
) -> None:
    """Defect 1: the link changes after the run listed the segments to plan and before
    the segment's plan starts: the plan uses the link as it is then (or skips a key that
    is gone), never the one it listed."""
    await links.link(conn, links.Link("vip", "1", "email"))
    await insert_changes(conn, [("vip", "a@x.com", "add"), ("vip", "+33612345678", "add")])
    real_plan_segment = plan.plan_segment

    async def changed_first(c: Any, run_id: int, key: str, *rest: Any) -> Any:
        await links.unlink(conn, key)
        if change != "unlink":
            await links.link(conn, links.Link(key, "2", "phoneNumber"))
        return await real_plan_segment(c, run_id, key, *rest)

    monkeypatch.setattr(plan, "plan_segment", changed_first)
    await plan_everything(settings, await new_run(conn))
    assert await orphans(conn) == 0
    waiting = await conn.fetchval("SELECT count(*) FROM syncd.membership_changes")
    if change == "unlink":
        assert waiting == 2  # kept until the key is linked again
        assert await conn.fetchval("SELECT count(*) FROM syncd.chunks") == 0
    else:
        assert waiting == 0
        row = await conn.fetchrow("SELECT identifier_type, criteo_segment_id FROM syncd.chunks")
        assert dict(row) == {"identifier_type": "phoneNumber", "criteo_segment_id": "2"}


async def add_untargeted_chunk(conn: Any, key: str, identifier_type: str = "email") -> None:
    """An open chunk as a release before per-chunk targets could leave it: no target,
    its key since unlinked."""
    plan_id = await conn.fetchval(
        "INSERT INTO syncd.plans (run_id, segment_key) VALUES ($1, $2) RETURNING id",
        await new_run(conn),
        key,
    )
    await conn.execute(
        "INSERT INTO syncd.chunks (plan_id, segment_key, operation, identifier_type, "
        "payload, identifier_count) VALUES ($1, $2, 'add', $3, convert_to('[\"x\"]', 'UTF8'), 1)",
        plan_id,
        key,
        identifier_type,
    )


async def test_a_chunk_that_cannot_be_sent_blocks_no_other_segment(
    conn: Any, settings: Settings
) -> None:
    """Defect 1: the oldest open chunk belongs to a key with no link (and no target): the
    claim passes over it to the other segments' chunks, and status says why it waits."""
    await add_untargeted_chunk(conn, "gone")
    await links.link(conn, links.Link("vip", "1", "email"))
    await insert_changes(conn, [("vip", "a@x.com", "add")])
    run_id = await new_run(conn)
    await plan_everything(settings, run_id)
    claimed = await conn.fetchrow(query("claim_chunk"), run_id, 30, ["default"])
    assert claimed is not None and claimed["segment_key"] == "vip"
    assert claimed["criteo_segment_id"] == "1"
    assert await conn.fetchrow(query("claim_chunk"), run_id, 30, ["default"]) is None
    shown = report.status_text(await status.read(conn))
    assert "cannot be sent" in shown
    line = next(x for x in shown.splitlines() if x.startswith("gone "))
    assert "no target" in line and "unlink gone --force" in line


async def test_a_key_with_untargeted_chunks_is_relinked_only_after_unlink_force(
    conn: Any,
) -> None:
    """Linking a key whose old chunks have no target would leave its new chunks waiting
    behind them for ever: refused, and `unlink --force` (no link needed) drops them."""
    await add_untargeted_chunk(conn, "gone", "customerId")
    with pytest.raises(UsageError, match="unlink gone --force"):
        await links.link(conn, links.Link("gone", "1", "email"))
    with pytest.raises(UsageError, match="1 chunk"):
        await links.unlink(conn, "gone")
    assert await links.unlink(conn, "gone", force=True) == 1
    assert (await links.link(conn, links.Link("gone", "1", "email"))).action == "linked"
    with pytest.raises(UsageError, match="not linked"):
        await links.unlink(conn, "never")


async def plan_chunks(conn: Any, settings: Settings, changes: list[tuple[str, str, str]]) -> int:
    await insert_changes(conn, changes)
    await plan_everything(settings, await new_run(conn))
    return int(await conn.fetchval("SELECT count(*) FROM syncd.chunks WHERE state <> 'done'"))


async def test_repointing_with_open_chunks_is_refused_unless_forced(
    conn: Any, settings: Settings
) -> None:
    """Defect 2: re-pointing a link while chunks are open would redirect them silently."""
    await links.link(conn, links.Link("vip", "1", "email"))
    assert await plan_chunks(conn, settings, [("vip", "a@x.com", "add")]) == 1
    same = await links.link(conn, links.Link("vip", "1", "email"))
    assert (same.action, same.open_chunks) == ("unchanged", 1)
    with pytest.raises(UsageError) as refused:
        await links.link(conn, links.Link("vip", "2", "email"))
    assert "1 chunk(s)" in str(refused.value) and "--force" in str(refused.value)
    assert await conn.fetchval("SELECT criteo_segment_id FROM syncd.segments") == "1"
    forced = await links.link(conn, links.Link("vip", "2", "email"), force=True)
    assert (forced.action, forced.open_chunks) == ("updated", 1)
    assert await conn.fetchval("SELECT criteo_segment_id FROM syncd.segments") == "2"
    assert await conn.fetchval("SELECT criteo_segment_id FROM syncd.chunks") == "1"


async def test_changing_the_identifier_type_is_refused_even_forced(
    conn: Any, settings: Settings
) -> None:
    await links.link(conn, links.Link("vip", "1", "email"))
    assert await plan_chunks(conn, settings, [("vip", "a@x.com", "add")]) == 1
    for wanted in (
        links.Link("vip", "1", "phoneNumber"),
        links.Link("vip", "1", "email", send_as="plain"),
    ):
        with pytest.raises(UsageError, match="unlink vip"):
            await links.link(conn, wanted, force=True)
    row = await conn.fetchrow("SELECT identifier_type, send_as FROM syncd.segments")
    assert dict(row) == {"identifier_type": "email", "send_as": "sha256"}


async def test_forced_repoint_sends_open_chunks_to_their_old_target(
    conn: Any, sandbox: RunningSandbox, settings: Settings
) -> None:
    """Defect 2, end to end: after a forced re-point, the chunks planned before it go to
    the segment they were planned for (and their audit rows say so); changes planned
    after it go to the new one."""
    for segment_id in ("1", "2"):
        sandbox.state.add_segment("retail-media", "42", "email", segment_id=segment_id)
    await links.link(conn, links.Link("vip", "1", "email"))
    assert await plan_chunks(conn, settings, [("vip", "old@x.com", "add")]) == 1
    await links.link(conn, links.Link("vip", "2", "email"), force=True)
    await insert_changes(conn, [("vip", "new@x.com", "add")])
    summary = await sync_once(settings)
    assert summary.exit_code == 0
    assert len(sandbox.state.segments["1"].members) == 1
    assert len(sandbox.state.segments["2"].members) == 1
    audit = await conn.fetch(
        "SELECT a.criteo_segment_id, c.criteo_segment_id AS chunk_target "
        "FROM syncd.push_audit a JOIN syncd.chunks c ON c.id = a.chunk_id ORDER BY a.chunk_id"
    )
    assert [(r["criteo_segment_id"], r["chunk_target"]) for r in audit] == [("1", "1"), ("2", "2")]
    sent = [(e["segment_id"], e["count"]) for e in sandbox.state.log]
    assert sent == [("1", 1), ("2", 1)]


async def test_unlink_refuses_open_chunks_unless_forced(conn: Any, settings: Settings) -> None:
    await links.link(conn, links.Link("vip", "1", "email"))
    assert await plan_chunks(conn, settings, [("vip", "a@x.com", "add"), ("vip", "b", "add")]) == 1
    with pytest.raises(UsageError, match="1 chunk"):
        await links.unlink(conn, "vip")
    assert await conn.fetchval("SELECT count(*) FROM syncd.segments") == 1
    assert await links.unlink(conn, "vip", force=True) == 1
    assert await conn.fetchval("SELECT count(*) FROM syncd.chunks") == 0
    assert await links.list_links(conn) == []


async def test_upgrade_gives_open_chunks_the_target_of_their_link(
    empty_database_url: str, tmp_path: Path
) -> None:
    """0006 backfills the target of chunks still open from their link, when that link
    still has the identifier type they were planned for; the others stay without one."""
    before = tmp_path / "before"
    before.mkdir()
    for m in db.load_migrations():
        if m.version < "0006":
            (before / m.name).write_text(m.sql)
    conn = await asyncpg.connect(empty_database_url)
    try:
        await db.migrate(conn, before)
        await conn.execute(
            "INSERT INTO syncd.segments (segment_key, api, criteo_segment_id, identifier_type,"
            " account_id, gum_caller_id) VALUES "
            "('ms', 'marketing-solutions', '7', 'gum', '3', 99),"
            "('retyped', 'retail-media', '8', 'customerId', NULL, NULL)"
        )
        for key, kind, state in [
            ("ms", "gum", "pending"),
            ("ms", "gum", "done"),
            ("retyped", "email", "pending"),
            ("gone", "email", "failed"),
        ]:
            plan_id = await conn.fetchval(
                "INSERT INTO syncd.plans (run_id, segment_key) VALUES ($1, $2) RETURNING id",
                await new_run(conn),
                key,
            )
            await conn.execute(
                "INSERT INTO syncd.chunks (plan_id, segment_key, operation, identifier_type,"
                " payload, identifier_count, state) VALUES ($1, $2, 'add', $3, NULL, 1, $4)",
                plan_id,
                key,
                kind,
                state,
            )
        await db.migrate(conn)
        rows = await conn.fetch(
            "SELECT segment_key, state, api, criteo_segment_id, account_id, gum_caller_id,"
            " send_as FROM syncd.chunks ORDER BY id"
        )
        targets = [tuple(r.values()) for r in rows]
        assert targets == [
            ("ms", "pending", "marketing-solutions", "7", "3", 99, "sha256"),
            ("ms", "done", None, None, None, None, None),
            ("retyped", "pending", None, None, None, None, None),
            ("gone", "failed", None, None, None, None, None),
        ]
    finally:
        await conn.close()


@pytest.mark.parametrize("segment_id", ["١٢٣", "²", "12 ", "", "1e3", "-1", "0x1f"])
def test_segment_id_must_be_ascii_digits(segment_id: str) -> None:
    with pytest.raises(UsageError, match="--segment-id"):
        links.validate(links.Link("vip", segment_id, "email"))


@pytest.mark.parametrize("caller", [0, -1, 2**31, 10**30])
def test_gum_caller_id_must_fit_criteo(caller: int) -> None:
    wanted = links.Link("vip", "1", "gum", api="marketing-solutions", gum_caller_id=caller)
    with pytest.raises(UsageError, match="--gum-caller-id"):
        links.validate(wanted)


def test_validate_keeps_a_good_marketing_solutions_link() -> None:
    wanted = links.Link(
        "vip", "0123", "GUM", api="marketing-solutions", gum_caller_id=2**31 - 1, account_id="9"
    )
    assert links.validate(wanted) == links.Link(
        "vip", "0123", "gum", api="marketing-solutions", gum_caller_id=2**31 - 1, account_id="9"
    )


@pytest.mark.parametrize(
    ("wanted", "message"),
    [
        (links.Link(" ", "1", "email"), "empty"),
        (links.Link("vip", "1", "email", api="display"), "unknown API"),
        (links.Link("vip", "1", "email", send_as="md5"), "--send-as"),
        (links.Link("vip", "1", "gum", api="marketing-solutions"), "needs --gum-caller-id"),
        (links.Link("vip", "1", "email", gum_caller_id=5), "only applies"),
    ],
)
def test_validate_refuses(wanted: links.Link, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        links.validate(wanted)


async def test_list_links_counts_waiting_changes_and_open_chunks(
    conn: Any, settings: Settings
) -> None:
    await links.link(conn, links.Link("vip", "1", "email"))
    await plan_chunks(conn, settings, [("vip", "a@x.com", "add")])
    await insert_changes(conn, [("vip", "b@x.com", "add")])
    [row] = await links.list_links(conn)
    assert (row["segment_key"], row["waiting_changes"], row["open_chunks"]) == ("vip", 1, 1)
    assert (row["api"], row["criteo_segment_id"], row["identifier_type"]) == (
        "retail-media",
        "1",
        "email",
    )


async def test_repointing_a_marketing_solutions_link_says_where_open_chunks_go(
    conn: Any, settings: Settings
) -> None:
    ms = {"api": "marketing-solutions", "account_id": "7", "gum_caller_id": 5}
    assert (await links.link(conn, links.Link("fans", "1", "gum", **ms))).action == "linked"
    moved = await links.link(conn, links.Link("fans", "2", "gum", **ms))
    assert moved.summary == "updated fans -> marketing-solutions segment 2"
    assert await plan_chunks(conn, settings, [("fans", "g1", "add")]) == 1
    forced = await links.link(
        conn, links.Link("fans", "3", "gum", **{**ms, "gum_caller_id": 6}), force=True
    )
    assert forced.summary == (
        "updated fans -> marketing-solutions segment 3; its 1 open chunk(s) still go to "
        "marketing-solutions segment 2 (account 7) (gumCallerId 5), the target they were "
        "planned for (changes planned from now on go to the new target)"
    )
    row = await conn.fetchrow("SELECT criteo_segment_id, gum_caller_id, send_as FROM syncd.chunks")
    assert tuple(row.values()) == ("2", 5, "sha256")


async def test_a_plan_waits_for_a_link_change_in_progress_then_uses_the_new_link(
    conn: Any, database_url: str
) -> None:
    """The link is being changed when the plan starts: the plan waits for it, meets a
    serialization failure (REPEATABLE READ), and plans again with the committed link."""
    await links.link(conn, links.Link("vip", "1", "email"))
    await insert_changes(conn, [("vip", "a@x.com", "add")])
    other = await asyncpg.connect(database_url)
    planner = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            await other.execute(query("get_segment_for_update"), "vip")
            await other.execute("UPDATE syncd.segments SET criteo_segment_id = '2'")
            planning = asyncio.ensure_future(
                plan.plan_segment(planner, await new_run(conn), "vip", 50_000)
            )
            assert await blocked_or_done(conn, planning, planner.get_server_pid())
        planned = await planning
    finally:
        await other.close()
        await planner.close()
    assert planned is not None and planned.adds == 1
    assert await conn.fetchval("SELECT criteo_segment_id FROM syncd.chunks") == "2"
