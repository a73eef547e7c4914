"""Criteo's call budget against the sandbox enforcing one: pacing from its headers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from structlog.testing import capture_logs

from syncd import links, report, status
from syncd.budget import SharedBudget
from syncd.db import create_pool
from syncd.plan import plan_segment
from syncd.sandbox import RunningSandbox, SandboxConfig, start_sandbox
from syncd.sync import sync_once
from tests.integration.test_push import faults, setup_segments, with_env


def statuses(sandbox: RunningSandbox) -> dict[str, int]:
    return dict(sandbox.state.requests.get("rm_add_remove", {}))


async def test_a_bucket_that_holds_a_few_calls_is_never_overdrawn(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """A bucket of 2 calls refilling at 600 a minute: syncd learns the limit from the
    headers and spaces its calls, so not one is refused (a minute's worth at once would
    be), with no ceiling of the user's own (SYNCD_RATE_LIMIT_PER_MIN=0)."""
    await setup_segments(conn, sandbox, count=4, per_segment=50)
    await faults(sandbox, rate_limit_per_minute=600, rate_limit_mode="bucket", rate_limit_burst=2)
    settings = with_env(env, SYNCD_CHUNK_SIZE="10", SYNCD_CONCURRENCY="4")
    summary = await sync_once(settings)
    assert (summary.exit_code, summary.chunks_acknowledged) == (0, 20)
    assert statuses(sandbox) == {"200": 20}


async def test_the_users_ceiling_caps_what_criteo_allows(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """The sandbox allows 6,000 a minute; SYNCD_RATE_LIMIT_PER_MIN=300 still spaces the
    calls at one per 0.2 s: 6 calls take at least a second (at most 2 go at once)."""
    await setup_segments(conn, sandbox, count=1, per_segment=60)
    await faults(sandbox, rate_limit_per_minute=6000, rate_limit_mode="bucket")
    settings = with_env(env, SYNCD_CHUNK_SIZE="10", SYNCD_RATE_LIMIT_PER_MIN="300")
    summary = await sync_once(settings)
    assert summary.exit_code == 0
    sent = sorted(e["at"] for e in sandbox.state.stats()["log"])
    assert len(sent) == 6 and sent[-1] - sent[0] >= 4 * 0.2


# --- several apps ----------------------------------------------------------------------------

BRAND_B = {
    "CRITEO_APPS": "brand_b",
    "CRITEO_APP_BRAND_B_CLIENT_ID": "brand-b-id",
    "CRITEO_APP_BRAND_B_CLIENT_SECRET": "brand-b-secret",
}


@asynccontextmanager
async def two_apps(env: dict[str, str], **config: Any) -> AsyncIterator[tuple[Any, dict[str, str]]]:
    """A sandbox that knows the default app and brand_b, and the env for both."""
    clients = (("brand-b-id", "brand-b-secret"),)
    async with await start_sandbox(SandboxConfig(clients=clients, **config)) as api:
        yield api, {**env, **BRAND_B, "CRITEO_API_URL": api.url}


async def link_two_apps(conn: Any, api: Any, per_segment: int) -> None:
    """a0 (app default) and b0 (app brand_b), `per_segment` adds each."""
    for key, criteo_id, app in (("a0", "2000", "default"), ("b0", "3000", "brand_b")):
        api.state.add_segment("retail-media", "42", "email", segment_id=criteo_id)
        await links.link(conn, links.Link(key, criteo_id, "email", app=app))
        await conn.execute(
            "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
            "SELECT $1, 'user' || g || '@example.com', 'add' FROM generate_series(1, $2) g",
            key,
            per_segment,
        )


async def test_each_app_pushes_its_segments_with_its_own_credentials(
    conn: Any, env: dict[str, str]
) -> None:
    async with two_apps(env) as (api, both):
        await link_two_apps(conn, api, per_segment=20)
        summary = await sync_once(with_env(both, SYNCD_CHUNK_SIZE="10"))
        assert (summary.exit_code, summary.chunks_acknowledged) == (0, 4)
        sent = [(e["segment_id"], e["client_id"]) for e in api.state.stats()["log"]]
    assert sorted(sent) == [("2000", "sandbox-client")] * 2 + [("3000", "brand-b-id")] * 2
    audit = await conn.fetch("SELECT DISTINCT segment_key, app FROM syncd.push_audit ORDER BY 1")
    assert [(r["segment_key"], r["app"]) for r in audit] == [("a0", "default"), ("b0", "brand_b")]


async def test_one_apps_429s_never_slow_another(conn: Any, env: dict[str, str]) -> None:
    """The default app meets a 429 asking for 4 s on its first request; brand_b's chunks
    go meanwhile, none of its requests refused, instead of queueing behind the default
    app's cool-down (two senders: each app keeps one)."""
    async with two_apps(env) as (api, both):
        await link_two_apps(conn, api, per_segment=30)
        api.state.faults.update(
            {"script": [{"status": 429, "retry_after": "4", "segment_id": "2000"}]}
        )
        settings = with_env(both, SYNCD_CHUNK_SIZE="10", SYNCD_CONCURRENCY="2")
        summary = await sync_once(settings)
        log = api.state.stats()["log"]
    assert (summary.exit_code, summary.chunks_acknowledged) == (0, 6)
    default = [e for e in log if e["client_id"] == "sandbox-client"]
    brand_b = [e for e in log if e["client_id"] == "brand-b-id"]
    assert [e["status"] for e in brand_b] == [200] * 3
    refused = next(e for e in default if e["status"] == 429)
    retried = next(
        e
        for e in default
        if e["idempotency_key"] == refused["idempotency_key"] and e["status"] == 200
    )
    # Every brand_b request went while the default app waited out its cool-down.
    assert max(e["at"] for e in brand_b) < retried["at"]


# --- one budget per app, shared by every process ---------------------------------------------


async def test_two_runs_pushing_for_one_app_together_stay_within_its_budget(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """Two runs at once (each its own runtime: pool, session, pacer, as two processes
    have) push one app's chunks against a bucket of 2 calls refilling at 600 a minute.
    Each alone would pace itself to the whole budget and together overdraw it; sharing
    the budget through PostgreSQL, the sandbox refuses none of their calls."""
    await setup_segments(conn, sandbox, count=4, per_segment=80)
    await faults(sandbox, rate_limit_per_minute=600, rate_limit_mode="bucket", rate_limit_burst=2)
    settings = with_env(env, SYNCD_CHUNK_SIZE="10", SYNCD_CONCURRENCY="4")
    first, second = await asyncio.gather(sync_once(settings), sync_once(settings))
    assert (first.exit_code, second.exit_code) == (0, 0)
    assert first.chunks_acknowledged + second.chunks_acknowledged == 32
    assert min(first.chunks_acknowledged, second.chunks_acknowledged) > 0  # both pushed
    assert statuses(sandbox) == {"200": 32}
    row = await conn.fetchrow("SELECT calls, limit_per_min FROM syncd.app_budgets")
    assert (row["calls"], row["limit_per_min"]) == (32, 600)


async def test_status_and_the_run_summary_show_each_apps_use_of_its_budget(
    conn: Any, env: dict[str, str]
) -> None:
    async with two_apps(env, rate_limit_per_minute=6000, rate_limit_mode="bucket") as (api, both):
        await link_two_apps(conn, api, per_segment=20)
        summary = await sync_once(with_env(both, SYNCD_CHUNK_SIZE="10"))
    assert summary.exit_code == 0
    text = report.run_summary(summary)
    assert "Criteo call budgets" in text, text
    rows = {b["app"]: b for b in summary.budgets}
    assert set(rows) == {"default", "brand_b"}
    for app in rows.values():
        assert (app["limit_per_min"], app["calls"], app["run_requests"]) == (6000, 2, 2)
    shown = report.status_text(await status.read(conn))
    assert "Criteo call budgets" in shown and "brand_b" in shown, shown


async def test_budget_bookkeeping_never_turns_an_answer_into_an_error(settings: Any) -> None:
    """What an answer taught (a hold, a new limit, a 429) is written for every process;
    with the database gone it is logged and dropped, never raised over Criteo's answer."""
    pool = await create_pool(settings)
    budget = SharedBudget(pool)
    await pool.close()
    with capture_logs() as logs:
        await budget.hold("default", 2_000_000_000.0, 0.0)
        await budget.note_limit("default", 250)
        await budget.rate_limited("default")
    assert [(e["event"], e["log_level"]) for e in logs] == [("budget_update_failed", "warning")] * 3


async def test_status_names_chunks_waiting_for_an_app_no_longer_configured(
    conn: Any, env: dict[str, str]
) -> None:
    """brand_b's chunks planned, then brand_b dropped from CRITEO_APPS: no run can send
    them; status says so, with what to do."""
    async with two_apps(env) as (api, _):
        await link_two_apps(conn, api, per_segment=5)
        run_id = await conn.fetchval(
            "INSERT INTO syncd.sync_runs (host, pid, target_window) VALUES ('t', 1, now()) "
            "RETURNING id"
        )
        await plan_segment(conn, run_id, "b0", 50_000)
    text = report.status_text(await status.read(conn, apps=("default",)))
    assert "chunks waiting for an app that is not configured" in text
    line = next(line for line in text.splitlines() if line.startswith("brand_b"))
    assert line.split() == ["brand_b", "b0", "1", "5"]
    assert "waiting for an app" not in report.status_text(
        await status.read(conn, apps=("default", "brand_b"))
    )
