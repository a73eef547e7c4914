"""Runs: liveness (lock, heartbeat, takeover bound), the migration lock, what status and the
run summary say, and run_id on every log line of a run."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import structlog
from structlog.testing import capture_logs

from syncd import plan, report, status
from syncd.config import Settings
from syncd.criteo import CriteoClient
from syncd.db import create_pool, query
from syncd.db import migrations as db
from syncd.db.locks import MIGRATION_LOCK_NAMESPACE, RUN_LOCK_NAMESPACE
from syncd.push import Pusher
from syncd.sandbox import RunningSandbox
from syncd.sync import sync_once
from tests.helpers import control, insert_generated_changes, link_in_process, wait_until


def with_env(env: dict[str, str], **extra: str) -> Settings:
    return Settings.from_env({**env, **extra})


async def lock_pid(conn: Any, run_id: int) -> int | None:
    """The backend holding a run's liveness lock."""
    pid = await conn.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND classid = $1 AND objsubid = 2 AND objid = $2::bigint::oid",
        RUN_LOCK_NAMESPACE,
        run_id,
    )
    return None if pid is None else int(pid)


# --- liveness ------------------------------------------------------------------------------------


async def test_a_run_that_loses_its_lock_stops_and_its_chunk_is_not_taken_over_at_once(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """The lock connection of run 1 is terminated while its request is slow at Criteo:
    run 1 claims and sends nothing more and ends failed (run_liveness_lost); run 2, started
    at that moment, sends the other chunks but not the one run 1 still has in flight."""
    # An 8 s HTTP timeout: a 2 s heartbeat vouching for 7 s. With 3 s (0.75 s beats) a
    # loaded 2-core machine once let run 1 lose its liveness before its first request.
    settings = with_env(
        env,
        SYNCD_HTTP_TIMEOUT_S="8",
        SYNCD_LEASE_S="20",
        SYNCD_CHUNK_SIZE="10",
        SYNCD_CONCURRENCY="1",
    )
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 30)  # three chunks
    await control(sandbox, "POST", "faults", {"latency_ms": 1500})
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        first = asyncio.create_task(sync_once(settings))

        async def request_in_flight() -> bool:
            if first.done():
                raise AssertionError(f"run 1 ended first: {first.result()}")
            return sandbox.state.in_flight == 1

        await wait_until(request_in_flight, 20, "run 1's first request at the sandbox")
        run_1 = await conn.fetchval("SELECT id FROM syncd.sync_runs")
        chunk_1 = await conn.fetchval("SELECT id FROM syncd.chunks WHERE state = 'claimed'")
        pid = await lock_pid(conn, run_1)
        assert pid is not None
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        await control(sandbox, "POST", "faults", {"latency_ms": 0})
        second = asyncio.create_task(sync_once(settings))
        lost, done = await first, await second

    assert (lost.status, lost.exit_code, lost.chunks_acknowledged) == ("failed", 1, 1)
    assert lost.error is not None and "liveness" in lost.error
    assert done.exit_code == 0, done
    run_2 = done.run_id
    audit = await conn.fetch("SELECT run_id, chunk_id, outcome FROM syncd.push_audit ORDER BY id")
    by_chunk = {r["chunk_id"]: (r["run_id"], r["outcome"]) for r in audit}
    assert len(audit) == 3 == len(by_chunk), audit
    assert by_chunk.pop(chunk_1) == (run_1, "acknowledged")  # its answer kept, by run 1
    assert set(by_chunk.values()) == {(run_2, "acknowledged")}  # run 1 claimed nothing more
    # The chunk in flight when the lock vanished was sent once: run 2 never took it.
    sent = Counter(e["idempotency_key"] for e in sandbox.state.log)
    assert sent[f"syncd-chunk-{chunk_1}"] == 1 and sum(sent.values()) == 3, sent
    lost_lines = [e for e in logs if e["event"] == "run_liveness_lost"]
    assert [(e["run_id"], e["log_level"]) for e in lost_lines] == [(run_1, "error")]
    row = await conn.fetchrow("SELECT status, error FROM syncd.sync_runs WHERE id = $1", run_1)
    assert row["status"] == "failed" and "liveness" in row["error"]


async def test_a_dead_runs_claims_wait_for_its_takeover_bound(
    conn: Any, database_url: str, sandbox: RunningSandbox, settings: Settings
) -> None:
    """A run whose lock is gone may still have a request in flight: its claims are taken
    over once its last heartbeat is older than the bound it recorded, not before."""
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 5)
    pool = await create_pool(settings)
    try:
        runs = [
            await conn.fetchrow(query("start_run"), "manual", "t", 1, 2.0, 10.0) for _ in range(2)
        ]
        dead, alive = runs[0]["id"], runs[1]["id"]
        lock_conn = await asyncpg.connect(database_url)
        await lock_conn.execute(query("hold_run_lock"), alive)
        async with pool.acquire() as pconn:
            await plan.plan_segment(pconn, dead, "vip", 50_000)
        async with CriteoClient.open(settings) as client:
            owner = Pusher(pool, client, settings, dead)
            taker = Pusher(pool, client, settings, alive)
            chunk = await owner.claim()
            assert chunk is not None
            # Run `dead` holds no lock (as after a kill -9), but its heartbeat is fresh.
            assert await taker.claim() is None
            assert await conn.fetchval(query("claimed_elsewhere"), alive)
            await conn.execute(
                "UPDATE syncd.sync_runs SET heartbeat_at = now() - interval '9 seconds' "
                "WHERE id = $1",
                dead,
            )
            assert await taker.claim() is None  # 9 s < the 10 s it recorded
            await conn.execute(
                "UPDATE syncd.sync_runs SET heartbeat_at = now() - interval '11 seconds' "
                "WHERE id = $1",
                dead,
            )
            assert not await conn.fetchval(query("claimed_elsewhere"), alive)
            taken = await taker.claim()
            assert taken is not None and taken.id == chunk.id
        await lock_conn.close()
    finally:
        await pool.close()


async def test_a_run_whose_heartbeat_is_stale_sends_nothing(
    conn: Any, sandbox: RunningSandbox, settings: Settings
) -> None:
    """The database refuses a send (the lease renewal before it) once a run's last
    heartbeat is older than the time it vouches for, whatever the run's process believes."""
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 5)
    pool = await create_pool(settings)
    try:
        run = await conn.fetchrow(query("start_run"), "manual", "t", 1, 2.0, 10.0)
        async with pool.acquire() as pconn:
            await plan.plan_segment(pconn, run["id"], "vip", 50_000)
        async with CriteoClient.open(settings) as client:
            pusher = Pusher(pool, client, settings, run["id"])
            chunk = await pusher.claim()
            assert chunk is not None
            await conn.execute(
                "UPDATE syncd.sync_runs SET heartbeat_at = now() - interval '3 seconds'"
            )
            assert await pusher.push(chunk) == "lease_lost"
    finally:
        await pool.close()
    assert len(sandbox.state.log) == 0


async def test_the_lock_connection_outlives_idle_session_timeout(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """idle_session_timeout (PostgreSQL 14+) closes idle sessions: the run's lock
    connection turns it off for itself, so a run longer than it keeps its lock."""
    name = await conn.fetchval("SELECT current_database()")
    await conn.execute(f"ALTER DATABASE {name} SET idle_session_timeout = '400ms'")
    settings = with_env(env, SYNCD_HTTP_TIMEOUT_S="3", SYNCD_LEASE_S="10")
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 5)
    await control(sandbox, "POST", "faults", {"latency_ms": 1500})
    with capture_logs() as logs:
        summary = await sync_once(settings)
    assert summary.exit_code == 0, summary
    assert [e for e in logs if e["event"] == "run_liveness_lost"] == []


# --- the migration lock -----------------------------------------------------------------------


async def test_migrate_does_not_wait_for_run_1(database_url: str) -> None:
    holder = await asyncpg.connect(database_url)
    migrator = await asyncpg.connect(database_url)
    try:
        await holder.execute(query("hold_run_lock"), 1)  # run 1 is alive
        assert await asyncio.wait_for(db.migrate(migrator), 10) == []
    finally:
        await holder.close()
        await migrator.close()


async def test_each_advisory_lock_has_a_namespace_of_its_own(conn: Any) -> None:
    plan_namespace = await conn.fetchval("SELECT hashtext('syncd.plan')")
    assert len({RUN_LOCK_NAMESPACE, MIGRATION_LOCK_NAMESPACE, plan_namespace}) == 3
    # The run's key is spelt in SQL too: both spellings agree with syncd.db.locks.
    assert f"pg_advisory_lock({RUN_LOCK_NAMESPACE}," in query("hold_run_lock")
    init = (db.migrations_dir() / "0001_init.sql").read_text()
    assert f"classid = {RUN_LOCK_NAMESPACE}" in init


# --- status and the run summary ------------------------------------------------------------------


async def test_status_of_a_killed_run_takes_its_totals_from_the_audit(
    conn: Any, sandbox: RunningSandbox, settings: Settings
) -> None:
    """A run killed with kill -9 never wrote its totals: status counts them from its plans
    and its audit rows."""
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 20)
    await conn.execute(
        "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
        "VALUES ('vip', 'not an address', 'add')"
    )
    pool = await create_pool(settings)
    try:
        run = await conn.fetchrow(query("start_run"), "manual", "t", 1, 60.0, 90.0)
        async with pool.acquire() as pconn:
            await plan.plan_segment(pconn, run["id"], "vip", 10)
        async with CriteoClient.open(settings) as client:
            pusher = Pusher(pool, client, settings, run["id"])
            for _ in range(2):
                chunk = await pusher.claim()
                assert chunk is not None
                assert await pusher.push(chunk) == "acknowledged"
    finally:
        await pool.close()
    # The process is gone (it holds no lock); the next run marks it crashed.
    assert [r["id"] for r in await conn.fetch(query("mark_dead_runs"))] == [run["id"]]
    [row] = await conn.fetch(query("recent_runs"), 5)
    assert row["status"] == "crashed"
    assert (row["changes_consumed"], row["identifiers_rejected"]) == (21, 1)
    assert (row["chunks_planned"], row["chunks_acknowledged"], row["chunks_failed"]) == (2, 2, 0)
    assert row["identifiers_sent"] == 20
    text = report.status_text(await status.read(conn, 5))
    line = next(x for x in text.splitlines() if x.lstrip().startswith(str(run["id"]) + " "))
    assert line.split()[1:2] == ["crashed"] and " 21 " in line, text


async def test_a_failed_run_with_chunks_left_did_not_make_the_window(
    conn: Any, sandbox: RunningSandbox, settings: Settings
) -> None:
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 5)
    await control(sandbox, "POST", "faults", {"script": [{"status": 400}]})
    summary = await sync_once(settings)
    assert (summary.status, summary.chunks_failed, summary.exit_code) == ("failed", 1, 1)
    assert summary.made_window is not True
    text = report.run_summary(summary)
    assert "made the window" not in text, text
    assert "did not make the window" in text, text
    row = await conn.fetchrow("SELECT made_window FROM syncd.sync_runs")
    assert row["made_window"] is not True
    line = (report.status_text(await status.read(conn, 5))).splitlines()[
        3
    ]  # run 1's, under the headers
    assert line.split()[:2] == ["1", "failed"] and line.endswith("  not made"), line


async def test_status_with_no_runs_asked_for(
    conn: Any, sandbox: RunningSandbox, settings: Settings
) -> None:
    assert "none yet" in report.status_text(await status.read(conn, 5))  # no run has happened
    await sync_once(settings)
    text = report.status_text(await status.read(conn, 0))
    assert "none yet" not in text, text
    assert "recent runs: 0 shown" in text, text


async def test_plan_preview_uses_up_no_run_id(
    conn: Any, sandbox: RunningSandbox, settings: Settings
) -> None:
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 5)
    for _ in range(2):
        [previewed] = await plan.preview(conn, 50_000)
        assert previewed.adds == 5
    assert await conn.fetchval("SELECT count(*) FROM syncd.sync_runs") == 0
    summary = await sync_once(settings)
    assert summary.run_id == 1


async def test_the_run_summary_says_changes_wait_for_an_unlinked_key(
    conn: Any, sandbox: RunningSandbox, settings: Settings
) -> None:
    await insert_generated_changes(conn, "ghost", 3)
    summary = await sync_once(settings)
    text = report.run_summary(summary)
    assert "3 change(s) wait for a link: ghost" in text, text
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 2)
    summary = await sync_once(settings)
    text = report.run_summary(summary)
    assert summary.chunks_acknowledged == 1
    assert "3 change(s) wait for a link: ghost" in text, text


# --- logs -------------------------------------------------------------------------------------


async def test_every_line_of_a_run_carries_its_run_id(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """Two runs at once: each planned segment and pushed chunk is logged with the run that
    did it (the database says which run that was)."""
    settings = with_env(env, SYNCD_CHUNK_SIZE="10", SYNCD_CONCURRENCY="2")
    for n in range(4):
        await link_in_process(conn, sandbox, f"s{n}", str(1000 + n))
        await insert_generated_changes(conn, f"s{n}", 50)
    await control(sandbox, "POST", "faults", {"latency_ms": 100})
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        summaries = await asyncio.gather(sync_once(settings), sync_once(settings))
    assert [s.exit_code for s in summaries] == [0, 0]
    run_ids = {s.run_id for s in summaries}
    assert len(run_ids) == 2
    run_lines = [e for e in logs if e["event"] in ("run_started", "run_finished")]
    assert Counter(e["run_id"] for e in run_lines) == {r: 2 for r in run_ids}
    pushed = {(e["run_id"], e["chunk_id"]) for e in logs if e["event"] == "chunk_pushed"}
    acked = await conn.fetch(
        "SELECT run_id, chunk_id FROM syncd.push_audit WHERE outcome = 'acknowledged'"
    )
    assert len(acked) == 20 and pushed == {(r["run_id"], r["chunk_id"]) for r in acked}
    planned = {(e["run_id"], e["plan_id"]) for e in logs if e["event"] == "segment_planned"}
    plans = await conn.fetch("SELECT run_id, id FROM syncd.plans WHERE chunks > 0")
    assert len(plans) == 4 and {(r["run_id"], r["id"]) for r in plans} <= planned
    mine = [e for e in logs if not e["event"].startswith("sandbox_")]
    assert all("run_id" in e for e in mine), mine
