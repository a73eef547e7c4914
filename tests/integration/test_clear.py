"""Clear chunks: a plan of one chunk that empties a segment's list on Criteo, through the
ordinary outbox (claim, lease, retries, audit, ledger), in plan order with the segment's
adds and removes: the layer under `syncd resync`."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from syncd import ledger as ledger_module
from syncd import links
from syncd.clear import queue_clear
from syncd.daemon import metrics
from syncd.db import query
from syncd.errors import SyncdError
from syncd.plan import plan_locks, plan_segment
from syncd.sandbox import RunningSandbox
from syncd.sync import sync_once
from tests.helpers import control, insert_changes, sha256
from tests.integration.test_ledger import folded, ledger, new_run
from tests.integration.test_push import Pushing, pushing, setup_segments, with_env


async def clear_plan(conn: Any, run_id: int | None, key: str = "s0") -> int:
    """Queue a clear of `key` as resync will: under the plan lock, in a transaction."""
    async with plan_locks(conn, key), conn.transaction():
        link = await conn.fetchrow(query("lock_link_for_plan"), key)
        return await queue_clear(conn, run_id, link)


async def add_plan(
    conn: Any, run_id: int, *addresses: str, key: str = "s0", size: int = 50_000
) -> None:
    await insert_changes(conn, [(key, a, "add") for a in addresses])
    await plan_segment(conn, run_id, key, size)


def hashed(*addresses: str) -> set[str]:
    return {sha256(a) for a in addresses}


@pytest.mark.parametrize(
    ("api", "method"), [("retail-media", "POST"), ("marketing-solutions", "DELETE")]
)
async def test_a_clear_chunk_empties_the_list_and_leaves_an_audit_row(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str], api: str, method: str
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=20, api=api)
    assert (await sync_once(with_env(env))).exit_code == 0
    assert len(sandbox.state.segments["1000"].members) == 20
    plan_id = await clear_plan(conn, None)
    plan = await conn.fetchrow("SELECT * FROM syncd.plans WHERE id = $1", plan_id)
    assert (plan["run_id"], plan["chunks"], plan["adds"], plan["removes"]) == (None, 1, 0, 0)
    calls = "SELECT calls FROM syncd.app_budgets WHERE app = 'default'"
    calls_before = await conn.fetchval(calls)

    summary = await sync_once(with_env(env))
    assert await conn.fetchval(calls) == calls_before + 1  # one call of the app's budget
    assert (summary.exit_code, summary.chunks_acknowledged) == (0, 1)
    assert sandbox.state.segments["1000"].members == set()
    (sent,) = [e for e in sandbox.state.log if e["operation"] == "clear"]
    assert (sent["method"], sent["status"]) == (method, 204 if method == "POST" else 200)
    audit = await conn.fetchrow("SELECT * FROM syncd.push_audit WHERE operation = 'clear'")
    assert (audit["outcome"], audit["run_id"], audit["plan_id"]) == (
        "acknowledged",
        summary.run_id,
        plan_id,
    )
    assert (audit["identifiers_sent"], audit["attempts"], audit["api"]) == (0, 1, api)
    assert (audit["nb_valid_identifiers"], audit["nb_invalid_identifiers"]) == (None, None)
    assert audit["criteo_segment_id"] == "1000"
    assert [(s["operation"], s["chunks_acknowledged"]) for s in summary.segments] == [("clear", 1)]
    assert await ledger(conn, "1000", api) == set()


async def test_a_clear_refused_with_a_5xx_is_retried_then_acknowledged(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    # A key of its own: the metric's series for it cannot come from another test.
    sandbox.state.add_segment("retail-media", "42", "email", segment_id="2000")
    await links.link(conn, links.Link("retried", "2000", "email"))
    await insert_changes(conn, [("retried", "x@example.com", "add")])
    assert (await sync_once(with_env(env))).exit_code == 0
    await clear_plan(conn, None, "retried")
    await control(sandbox, "POST", "faults", {"script": [{"status": 503}, {"status": 502}]})

    async def sleep(delay: float) -> None:
        pass

    series = {"segment": "retried", "operation": "clear"}
    assert metrics.REGISTRY.get_sample_value("syncd_identifiers_sent_total", series) is None
    with capture_logs() as logs:
        summary = await sync_once(with_env(env, SYNCD_RETRY_BASE_S="0.01"), sleep=sleep)
    assert (summary.exit_code, summary.chunks_acknowledged) == (0, 1)
    assert sandbox.state.segments["2000"].members == set()
    audit = await conn.fetchrow(
        "SELECT outcome, attempts, http_status FROM syncd.push_audit WHERE operation = 'clear'"
    )
    assert (audit["outcome"], audit["attempts"], audit["http_status"]) == ("acknowledged", 3, 204)
    retries = [e for e in logs if e["event"] == "chunk_retry"]
    assert [r["status"] for r in retries] == [503, 502]
    pushed = [e for e in logs if e["event"] == "chunk_pushed"]
    assert [(p["operation"], p["identifiers"], p["outcome"]) for p in pushed] == [
        ("clear", 0, "acknowledged")
    ]
    # counted as acknowledged with op="clear", no identifiers
    assert metrics.REGISTRY.get_sample_value("syncd_identifiers_sent_total", series) == 0.0


@pytest.mark.parametrize(
    ("api", "answer", "outcome", "code"),
    [
        ("retail-media", {"status": 201, "body": ""}, "acknowledged", None),  # the docs
        ("retail-media", {"status": 200, "body": '{"data": {"id": "1000"}}'}, "acknowledged", None),
        (
            "marketing-solutions",
            {"status": 200, "body": '{"data": [], "errors": [{"code": "segment-not-found"}]}'},
            "failed",
            "segment-not-found",
        ),
    ],
)
async def test_any_2xx_clears_unless_it_carries_errors(
    conn: Any,
    sandbox: RunningSandbox,
    env: dict[str, str],
    api: str,
    answer: dict[str, Any],
    outcome: str,
    code: str | None,
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=0, api=api)
    await clear_plan(conn, None)
    await control(sandbox, "POST", "faults", {"script": [answer]})
    await sync_once(with_env(env))
    audit = await conn.fetchrow("SELECT * FROM syncd.push_audit WHERE operation = 'clear'")
    assert (audit["outcome"], audit["error_code"]) == (outcome, code)
    assert audit["http_status"] == answer["status"]


async def test_a_clear_refused_for_good_fails_and_holds_back_the_next_plan(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    assert (await sync_once(with_env(env))).exit_code == 0
    run_id = await new_run(conn)
    await clear_plan(conn, run_id)
    await add_plan(conn, run_id, "after@example.com")
    await control(sandbox, "POST", "faults", {"script": [{"status": 400, "code": "nope"}]})
    summary = await sync_once(with_env(env))
    assert (summary.exit_code, summary.chunks_failed) == (1, 1)
    # nothing after the clear went out: the list is as it was
    assert len(sandbox.state.segments["1000"].members) == 5
    assert await ledger(conn, "1000") == sandbox.state.segments["1000"].members
    again = await sync_once(with_env(env))
    assert (again.exit_code, again.chunks_acknowledged) == (0, 2)
    assert sandbox.state.segments["1000"].members == hashed("after@example.com")


async def test_adds_before_a_clear_are_wiped_and_adds_after_it_stay(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """Plan A (adds), plan B (clear), plan C (adds) of one segment, all queued before one
    run: Criteo ends with exactly C's members, and so does the ledger."""
    await setup_segments(conn, sandbox, count=1, per_segment=0)
    run_id = await new_run(conn)
    await add_plan(conn, run_id, "a1@example.com", "a2@example.com", "both@example.com", size=2)
    await clear_plan(conn, run_id)
    await add_plan(conn, run_id, "c1@example.com", "both@example.com", size=1)
    summary = await sync_once(with_env(env))
    assert (summary.exit_code, summary.chunks_acknowledged) == (0, 5)
    members = hashed("c1@example.com", "both@example.com")
    assert sandbox.state.segments["1000"].members == members
    assert await ledger(conn, "1000") == members
    ops = [e["operation"] for e in sandbox.state.log]
    assert ops == ["add", "add", "clear", "add", "add"]


async def push_all(p: Pushing) -> None:
    """Send every chunk the pusher can claim, one at a time (so in plan order), no fold."""
    while (chunk := await p.pusher.claim()) is not None:
        assert await p.pusher.push(chunk) == "acknowledged"


@pytest.mark.parametrize("batch", [50, 2])
async def test_a_fold_batch_never_crosses_a_clear(
    conn: Any,
    sandbox: RunningSandbox,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    batch: int,
) -> None:
    """A clear in the middle of what one batch would fold (or anywhere in small batches):
    the chunks before it are folded, the target's ledger emptied, then the rest folded;
    another target's rows and chunks, before and after the clear, are untouched by it."""
    await setup_segments(conn, sandbox, count=2, per_segment=0)
    monkeypatch.setattr(ledger_module, "FOLD_BATCH_CHUNKS", batch)
    async with pushing(conn, with_env(env)) as p:
        run_id = p.run_ids[0]
        await add_plan(conn, run_id, "old@example.com", key="s1")
        await add_plan(conn, run_id, *(f"a{n}@example.com" for n in range(6)), size=2)
        await clear_plan(conn, run_id)
        await add_plan(conn, run_id, "other@example.com", key="s1")
        await add_plan(conn, run_id, "c1@example.com", "c2@example.com", "c3@example.com", size=2)
        await insert_changes(conn, [("s0", "c1@example.com", "remove")])
        await plan_segment(conn, run_id, "s0", 50_000)
        await push_all(p)
    assert sandbox.state.segments["1000"].members == hashed("c2@example.com", "c3@example.com")
    assert await folded(conn, "1000") == set()
    done = await ledger_module.fold(conn)
    # s1: 2 add chunks; s0: 3 add chunks, the clear, 2 add chunks, 1 remove chunk
    assert (done.chunks, done.clears) == (9, 1)
    assert await folded(conn, "1000") == sandbox.state.segments["1000"].members
    assert await folded(conn, "1001") == hashed("old@example.com", "other@example.com")
    assert await folded(conn, "1001") == sandbox.state.segments["1001"].members
    unfolded = "SELECT count(*) FROM syncd.chunks WHERE state = 'done' AND payload IS NOT NULL"
    assert await conn.fetchval(unfolded) == 0
    assert (await ledger_module.fold(conn)).chunks == 0


async def test_a_fold_before_the_clear_then_after_it(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """The ledger folded when only the adds before the clear were acknowledged, then again
    once the clear and the adds after it were: the clear wipes what was folded before."""
    await setup_segments(conn, sandbox, count=1, per_segment=0)
    run_id = await new_run(conn)
    await add_plan(conn, run_id, "a1@example.com", "a2@example.com")
    assert (await sync_once(with_env(env))).exit_code == 0
    assert await ledger(conn, "1000") == hashed("a1@example.com", "a2@example.com")
    await clear_plan(conn, None)
    await add_plan(conn, run_id, "a2@example.com", "c@example.com")
    assert (await sync_once(with_env(env))).exit_code == 0
    members = hashed("a2@example.com", "c@example.com")
    assert sandbox.state.segments["1000"].members == members
    assert await ledger(conn, "1000") == members


async def test_a_run_that_stops_after_the_clear_leaves_the_adds_to_the_next_run(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """The clear acknowledged, the adds of the next plan not sent yet when the run ends
    (a crash, or a stop): the list is empty meanwhile, and the next run sends the adds."""
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    assert (await sync_once(with_env(env))).exit_code == 0
    async with pushing(conn, with_env(env)) as p:
        await clear_plan(conn, None)
        await add_plan(conn, p.run_ids[0], "c1@example.com", "c2@example.com", size=1)
        chunk = await p.pusher.claim()
        assert chunk is not None and chunk.operation == "clear"
        assert await p.pusher.push(chunk) == "acknowledged"
    assert sandbox.state.segments["1000"].members == set()
    assert await ledger(conn, "1000") == set()
    summary = await sync_once(with_env(env))
    assert (summary.exit_code, summary.chunks_acknowledged) == (0, 2)
    members = hashed("c1@example.com", "c2@example.com")
    assert sandbox.state.segments["1000"].members == members
    assert await ledger(conn, "1000") == members


async def test_a_clear_whose_run_died_in_flight_is_sent_again_then_the_adds(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """The clear claimed and sent, its answer lost, and its run gone: the next run takes
    the clear over, sends it again (harmless: the list is empty either way), then the adds."""
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    assert (await sync_once(with_env(env))).exit_code == 0
    async with pushing(conn, with_env(env, SYNCD_MAX_ATTEMPTS="1")) as p:
        await clear_plan(conn, None)
        await add_plan(conn, p.run_ids[0], "c@example.com")
        chunk = await p.pusher.claim()
        assert chunk is not None and chunk.operation == "clear"
        await control(sandbox, "POST", "faults", {"script": [{"drop": "after"}]})
        assert await p.pusher.push(chunk) == "failed"
        # The request went out and was applied, its answer lost; then the run "died"
        # holding the claim.
        await conn.execute(
            "UPDATE syncd.chunks SET state = 'claimed', owner_run_id = $2 WHERE id = $1",
            chunk.id,
            p.run_ids[0],
        )
    assert sandbox.state.segments["1000"].members == set()
    summary = await sync_once(with_env(env))
    assert (summary.exit_code, summary.chunks_acknowledged) == (0, 2)
    assert [e["operation"] for e in sandbox.state.log][-3:] == ["clear", "clear", "add"]
    assert sandbox.state.segments["1000"].members == hashed("c@example.com")
    assert await ledger(conn, "1000") == hashed("c@example.com")


async def test_queueing_a_clear_needs_a_transaction_and_the_plan_lock(
    conn: Any, sandbox: RunningSandbox
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=0)
    link = await conn.fetchrow(query("lock_link_for_plan"), "s0")
    with pytest.raises(SyncdError, match="transaction"):
        await queue_clear(conn, None, link)
    with pytest.raises(SyncdError, match="plan lock"):
        async with conn.transaction():
            await queue_clear(conn, None, link)
    async with plan_locks(conn, "other"), conn.transaction():
        with pytest.raises(SyncdError, match="plan lock"):
            await queue_clear(conn, None, link)
    assert await conn.fetchval("SELECT count(*) FROM syncd.plans") == 0
    plan_id = await clear_plan(conn, None)
    chunk = await conn.fetchrow("SELECT * FROM syncd.chunks WHERE plan_id = $1", plan_id)
    assert (chunk["operation"], chunk["identifier_count"], bytes(chunk["payload"])) == (
        "clear",
        0,
        b"[]",
    )
    assert (chunk["api"], chunk["criteo_segment_id"], chunk["identifier_type"]) == (
        "retail-media",
        "1000",
        "email",
    )
    assert (chunk["send_as"], chunk["app"], chunk["state"]) == ("sha256", "default", "pending")
    # the lock is released after the block
    assert not await conn.fetchval(query("holds_segment_plan_lock"), "s0")


async def test_the_database_keeps_clear_chunks_empty(conn: Any, sandbox: RunningSandbox) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=0)
    plan_id = await clear_plan(conn, None)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(
            "UPDATE syncd.chunks SET identifier_count = 1 WHERE plan_id = $1", plan_id
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("UPDATE syncd.chunks SET operation = 'wipe' WHERE plan_id = $1", plan_id)
