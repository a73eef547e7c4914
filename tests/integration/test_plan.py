"""Planning: netting after normalisation, chunking, rejections, unlinked keys, late commits."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from syncd import links, plan
from syncd.config import Settings
from syncd.sandbox import RunningSandbox
from syncd.sync import sync_once
from tests.helpers import insert_changes, sha256
from tests.integration.test_links import blocked_or_done


async def link(conn: Any, key: str, kind: str = "email", chunk_id: str = "1") -> None:
    await links.link(conn, links.Link(key, chunk_id, kind))


async def new_run(conn: Any) -> int:
    row = await conn.fetchrow(
        "INSERT INTO syncd.sync_runs (host, pid, target_window) VALUES ('t', 1, now()) RETURNING id"
    )
    return int(row["id"])


async def plan_one(conn: Any, key: str, chunk_size: int = 50_000) -> plan.SegmentPlan:
    run_id = await new_run(conn)
    planned = await plan.plan_segment(conn, run_id, key, chunk_size)
    assert planned is not None
    return planned


async def chunk_payloads(conn: Any, key: str) -> dict[str, set[str]]:
    rows = await conn.fetch(
        "SELECT operation, payload FROM syncd.chunks WHERE segment_key = $1", key
    )
    out: dict[str, set[str]] = {"add": set(), "remove": set()}
    for r in rows:
        out[r["operation"]].update(json.loads(r["payload"]))
    return out


async def test_latest_change_wins_after_normalisation(conn: Any) -> None:
    await link(conn, "vip")
    await insert_changes(
        conn,
        [
            ("vip", "A@x.com ", "add"),
            ("vip", "a@x.com", "remove"),  # same person: the remove wins
            ("vip", "b@x.com", "remove"),
            ("vip", " B@X.com", "add"),  # the add wins
            ("vip", "c@x.com", "add"),
            ("vip", "c@x.com", "add"),  # duplicates collapse
        ],
    )
    p = await plan_one(conn, "vip")
    assert (p.changes_consumed, p.adds, p.removes, p.rejected, p.chunks) == (6, 2, 1, 0, 2)
    assert await chunk_payloads(conn, "vip") == {
        "add": {sha256("b@x.com"), sha256("c@x.com")},
        "remove": {sha256("a@x.com")},
    }
    assert await conn.fetchval("SELECT count(*) FROM syncd.membership_changes") == 0


async def test_hashed_and_plain_forms_of_one_person_net_together(conn: Any) -> None:
    await link(conn, "vip")
    await insert_changes(conn, [("vip", "a@x.com", "add"), ("vip", sha256("a@x.com"), "remove")])
    p = await plan_one(conn, "vip")
    assert (p.adds, p.removes) == (0, 1)


async def test_chunks_respect_the_size_and_one_operation_each(conn: Any) -> None:
    await link(conn, "vip")
    await insert_changes(conn, [("vip", f"u{i}@x.com", "add") for i in range(2_500)])
    await insert_changes(conn, [("vip", f"r{i}@x.com", "remove") for i in range(1_001)])
    p = await plan_one(conn, "vip", chunk_size=1_000)
    rows = await conn.fetch(
        "SELECT operation, identifier_count, "
        "json_array_length(convert_from(payload, 'UTF8')::json) AS n "
        "FROM syncd.chunks ORDER BY operation, identifier_count"
    )
    assert p.chunks == 5
    assert [(r["operation"], r["n"]) for r in rows] == [
        ("add", 500),
        ("add", 1000),
        ("add", 1000),
        ("remove", 1),
        ("remove", 1000),
    ]
    assert all(r["identifier_count"] == r["n"] for r in rows)


async def test_invalid_identifiers_are_rejected_visibly(conn: Any) -> None:
    await link(conn, "vip")
    await insert_changes(
        conn,
        [
            ("vip", "ok@x.com", "add"),
            ("vip", "nope", "add"),
            ("vip", None, "remove"),
            ("vip", "", "add"),
        ],
    )
    p = await plan_one(conn, "vip")
    assert (p.adds, p.rejected) == (1, 3)
    rows = await conn.fetch(
        "SELECT identifier, reason FROM syncd.rejected_identifiers ORDER BY change_id"
    )
    assert [(r["identifier"], r["reason"]) for r in rows] == [
        ("nope", "not_an_email"),
        (None, "empty"),
        ("", "empty"),
    ]


async def test_unlinked_keys_wait(conn: Any) -> None:
    await link(conn, "vip")
    await insert_changes(conn, [("vip", "a@x.com", "add"), ("later", "b@x.com", "add")])
    todo = await conn.fetch("SELECT segment_key FROM syncd.segments")
    assert [r["segment_key"] for r in todo] == ["vip"]
    await plan_one(conn, "vip")
    left = await conn.fetch("SELECT segment_key, identifier FROM syncd.membership_changes")
    assert [(r["segment_key"], r["identifier"]) for r in left] == [("later", "b@x.com")]


async def test_late_committed_change_is_consumed_by_the_next_plan(
    conn: Any, database_url: str
) -> None:
    await link(conn, "vip")
    crm = await asyncpg.connect(database_url)
    try:
        tx = crm.transaction()
        await tx.start()
        await crm.execute(
            "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
            "VALUES ('vip', 'early@x.com', 'add')"
        )  # smaller id, committed late
        await insert_changes(conn, [("vip", "later@x.com", "add")])
        first = await plan_one(conn, "vip")
        await tx.commit()
        second = await plan_one(conn, "vip")
    finally:
        await crm.close()
    assert (first.adds, second.adds) == (1, 1)
    payloads = await chunk_payloads(conn, "vip")
    assert payloads["add"] == {sha256("early@x.com"), sha256("later@x.com")}


async def plan_while_another_session_runs(
    conn: Any, database_url: str, monkeypatch: Any, key: str, statement: str
) -> tuple[plan.SegmentPlan, int]:
    """Plan `key`; right after the plan first reads the inbox, and before it deletes what
    it read, another session runs `statement`. The plan, and how many reads it took."""
    other = await asyncpg.connect(database_url)
    real_plan = plan._plan
    reads = 0

    async def read_then_interfere(*args: Any) -> plan.SegmentPlan:
        nonlocal reads
        reads += 1
        result = await real_plan(*args)
        if reads == 1:
            await other.execute(statement)
        return result

    monkeypatch.setattr(plan, "_plan", read_then_interfere)
    try:
        planned = await plan_one(conn, key)
        return planned, reads
    finally:
        monkeypatch.setattr(plan, "_plan", real_plan)
        await other.close()


async def test_change_committed_during_a_plan_waits_for_the_next(
    conn: Any, database_url: str, monkeypatch: Any
) -> None:
    """A change that commits after the plan read the inbox but before it deleted what it
    read is neither planned nor deleted: the next plan takes it."""
    await link(conn, "vip")
    await insert_changes(conn, [("vip", "first@x.com", "add")])
    first, _ = await plan_while_another_session_runs(
        conn,
        database_url,
        monkeypatch,
        "vip",
        "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
        "VALUES ('vip', 'during@x.com', 'add')",
    )
    left = await conn.fetch("SELECT identifier FROM syncd.membership_changes")
    assert [r["identifier"] for r in left] == ["during@x.com"]
    second = await plan_one(conn, "vip")
    assert (first.changes_consumed, second.changes_consumed) == (1, 1)
    payloads = await chunk_payloads(conn, "vip")
    assert payloads["add"] == {sha256("first@x.com"), sha256("during@x.com")}


async def test_plan_meets_a_foreign_delete_and_plans_again(
    conn: Any, database_url: str, monkeypatch: Any
) -> None:
    """Something other than syncd deletes an inbox row the plan read: the plan's DELETE
    meets a serialization failure, rolls back, and plans again from what is left."""
    await link(conn, "vip")
    await insert_changes(conn, [("vip", "a@x.com", "add"), ("vip", "b@x.com", "add")])
    p, reads = await plan_while_another_session_runs(
        conn,
        database_url,
        monkeypatch,
        "vip",
        "DELETE FROM syncd.membership_changes WHERE identifier = 'b@x.com'",
    )
    assert reads == 2
    assert (p.changes_consumed, p.adds) == (1, 1)
    assert await chunk_payloads(conn, "vip") == {"add": {sha256("a@x.com")}, "remove": set()}
    assert await conn.fetchval("SELECT count(*) FROM syncd.plans") == 1


async def test_preview_changes_nothing(conn: Any) -> None:
    await link(conn, "vip")
    await insert_changes(conn, [("vip", "a@x.com", "add"), ("vip", "bad", "add")])
    plans = await plan.preview(conn, 50_000)
    assert [(p.segment_key, p.adds, p.rejected) for p in plans] == [("vip", 1, 1)]
    assert await conn.fetchval("SELECT count(*) FROM syncd.membership_changes") == 2
    assert await conn.fetchval("SELECT count(*) FROM syncd.chunks") == 0
    assert await conn.fetchval("SELECT count(*) FROM syncd.rejected_identifiers") == 0


# Two real PostgreSQL errors a plan of one segment can meet: its statement timing out
# (a timeout set low for that plan only, and a statement that sleeps past it), or a
# constraint violation whose DETAIL shows the failing row (identifiers included).
PLAN_FAILURES = {
    "statement_timeout": """
        CREATE FUNCTION public.low_timeout() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM set_config('statement_timeout', '50', true); RETURN NEW; END $$;
        CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(30); RETURN NEW; END $$;
        CREATE TRIGGER low_timeout BEFORE INSERT ON syncd.plans FOR EACH ROW
            WHEN (NEW.segment_key = 'huge') EXECUTE FUNCTION public.low_timeout();
        CREATE TRIGGER slow BEFORE INSERT ON syncd.chunks FOR EACH ROW
            WHEN (NEW.segment_key = 'huge') EXECUTE FUNCTION public.slow();
    """,
    "check_violation": """
        ALTER TABLE syncd.chunks ADD CONSTRAINT no_huge CHECK (segment_key <> 'huge');
    """,
}


@pytest.mark.parametrize("failure", sorted(PLAN_FAILURES))
async def test_one_segments_failing_plan_does_not_stop_the_others(
    conn: Any, sandbox: RunningSandbox, settings: Settings, failure: str
) -> None:
    """Defect 8: the plan of `huge` fails; the other segments are planned and pushed,
    the failure is logged with its segment (and no identifier), `huge`'s changes stay in
    the inbox for the next run, and the run ends with exit code 1 (work left)."""
    for key, segment_id in (("a", "1"), ("huge", "2"), ("z", "3")):
        sandbox.state.add_segment("retail-media", "42", "email", segment_id=segment_id)
        await link(conn, key, chunk_id=segment_id)
        await insert_changes(conn, [(key, f"{key}{i}@x.com", "add") for i in range(3)])
    await conn.execute(PLAN_FAILURES[failure])
    with capture_logs() as logs:
        summary = await sync_once(settings)
    assert summary.exit_code == 1
    assert summary.status == "failed" and summary.error and "huge" in summary.error
    sizes = {sid: len(sandbox.state.segments[sid].members) for sid in ("1", "2", "3")}
    assert sizes == {"1": 3, "2": 0, "3": 3}
    left = await conn.fetch("SELECT DISTINCT segment_key FROM syncd.membership_changes")
    assert [r["segment_key"] for r in left] == ["huge"]
    failed = [e for e in logs if e["event"] == "plan_failed"]
    assert [e["segment_key"] for e in failed] == ["huge"]
    assert (
        failed[0]["sqlstate"] == {"statement_timeout": "57014", "check_violation": "23514"}[failure]
    )
    assert "huge0@x.com" not in repr(logs) and sha256("huge0@x.com") not in repr(logs)
    run = await conn.fetchrow("SELECT status, error FROM syncd.sync_runs")
    assert run["status"] == "failed" and "huge" in run["error"]


CRM_TRIGGER = Path(__file__).parents[2] / "sql" / "examples" / "crm_trigger.sql"


async def test_the_example_crm_trigger_makes_id_order_follow_commit_order(
    conn: Any, database_url: str
) -> None:
    """Defect 16: with the example trigger, a second CRM transaction changing the same
    membership waits for the first to commit before its change gets an id, so the plan's
    'highest id wins' keeps what the CRM committed last."""
    await conn.execute(
        "CREATE SCHEMA crm; CREATE TABLE crm.segment_members (segment_key text NOT NULL,"
        " email text NOT NULL); CREATE UNIQUE INDEX segment_members_person"
        " ON crm.segment_members (segment_key, lower(btrim(email)))"
    )
    await conn.execute(CRM_TRIGGER.read_text())
    await link(conn, "vip")
    await conn.execute("INSERT INTO crm.segment_members VALUES ('vip', 'jane@x.com')")
    first = await asyncpg.connect(database_url)
    second = await asyncpg.connect(database_url)
    try:
        async with first.transaction():
            await first.execute("UPDATE crm.segment_members SET email = 'Jane@x.com'")
            later = asyncio.ensure_future(second.execute("DELETE FROM crm.segment_members"))
            assert await blocked_or_done(conn, later, second.get_server_pid())
        await later  # the delete committed after the update, and drew its id after it
    finally:
        await first.close()
        await second.close()
    inbox = await conn.fetch("SELECT operation FROM syncd.membership_changes ORDER BY id")
    assert [r["operation"] for r in inbox] == ["add", "remove", "add", "remove"]
    p = await plan_one(conn, "vip")
    assert (p.adds, p.removes) == (0, 1)  # Jane left the segment: the CRM's last word
