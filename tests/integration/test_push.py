"""Pushing, in process: concurrency, the shared 429 back-off, splitting, deferral, answers."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import aiohttp
import asyncpg
import pytest
from structlog.testing import capture_logs

from syncd import links
from syncd.config import Settings
from syncd.criteo import CriteoClient
from syncd.db import create_pool
from syncd.plan import plan_segment
from syncd.push import PAYLOAD_SLICE_BYTES, Pusher
from syncd.sandbox import RunningSandbox
from syncd.sync import sync_once


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def setup_segments(
    conn: Any, sandbox: RunningSandbox, count: int, per_segment: int, api: str = "retail-media"
) -> None:
    for n in range(count):
        criteo_id = str(1000 + n)
        sandbox.state.add_segment(api, "42", "email", segment_id=criteo_id)
        await links.link(conn, links.Link(f"s{n}", criteo_id, "email", api=api))
        await conn.execute(
            "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
            "SELECT $1, 'user' || g || '@example.com', 'add' FROM generate_series(1, $2) g",
            f"s{n}",
            per_segment,
        )


async def faults(sandbox: RunningSandbox, **body: Any) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{sandbox.url}/_sandbox/faults", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()


def with_env(env: dict[str, str], **extra: str) -> Settings:
    return Settings.from_env({**env, **extra})


async def test_concurrency_is_capped_and_used(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=6, per_segment=300)
    await faults(sandbox, latency_ms=150)
    settings = with_env(env, SYNCD_CONCURRENCY="3", SYNCD_CHUNK_SIZE="100")
    summary = await sync_once(settings)
    assert summary.exit_code == 0
    assert summary.chunks_acknowledged == 18
    stats = sandbox.state.stats()
    assert stats["max_in_flight"] == 3  # never more than SYNCD_CONCURRENCY, and all of it used
    for n in range(6):
        members = sandbox.state.segments[str(1000 + n)].members
        assert members == {sha(f"user{i}@example.com") for i in range(1, 301)}


async def test_429_pauses_every_sender(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=4, per_segment=10)
    await faults(sandbox, script=[{"status": 429, "retry_after": "1"}])
    started = time.monotonic()
    summary = await sync_once(with_env(env, SYNCD_CONCURRENCY="4"))
    assert summary.exit_code == 0
    log = sandbox.state.stats()["log"]
    first_429 = next(e["at"] for e in log if e["status"] == 429)
    after = [e["at"] for e in log if e["status"] == 200 and e["at"] > first_429 + 0.05]
    # Every request that started after the 429 waited out the shared cool-down.
    assert after and min(after) >= first_429 + 0.95
    assert time.monotonic() - started >= 1.0


async def test_too_large_chunk_is_halved(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=1000)
    await faults(sandbox, script=[{"status": 413}])
    summary = await sync_once(with_env(env))
    assert summary.exit_code == 0
    rows = await conn.fetch("SELECT outcome, identifiers_sent FROM syncd.push_audit ORDER BY id")
    assert [(r["outcome"], r["identifiers_sent"]) for r in rows] == [
        ("split", 1000),
        ("acknowledged", 500),
        ("acknowledged", 500),
    ]
    assert len(sandbox.state.segments["1000"].members) == 1000


async def test_long_retry_after_defers_the_chunk_to_a_later_run(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    await faults(sandbox, script=[{"status": 429, "retry_after": "120"}])
    summary = await sync_once(with_env(env, SYNCD_RETRY_MAX_WAIT_S="5"))
    assert (summary.exit_code, summary.chunks_left) == (1, 1)
    chunk = await conn.fetchrow(
        "SELECT state, available_at > now() + interval '100 s' AS later FROM syncd.chunks"
    )
    assert (chunk["state"], chunk["later"]) == ("pending", True)
    audit = await conn.fetchrow("SELECT outcome, http_status FROM syncd.push_audit")
    assert (audit["outcome"], audit["http_status"]) == ("deferred", 429)
    # Once due, the next run sends it.
    await conn.execute("UPDATE syncd.chunks SET available_at = now()")
    assert (await sync_once(with_env(env))).exit_code == 0


async def test_attempt_cap_fails_the_chunk_and_the_next_run_retries(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    await faults(sandbox, script=[{"status": 503}] * 3)
    summary = await sync_once(with_env(env, SYNCD_MAX_ATTEMPTS="3"))
    assert (summary.exit_code, summary.chunks_failed) == (1, 1)
    audit = await conn.fetchrow("SELECT outcome, attempts, http_status FROM syncd.push_audit")
    assert (audit["outcome"], audit["attempts"], audit["http_status"]) == ("failed", 3, 503)
    again = await sync_once(with_env(env))
    assert (again.exit_code, again.chunks_acknowledged) == (0, 1)


async def test_invalid_counts_and_warnings_are_kept(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    sandbox.state.add_segment("retail-media", "42", "email", segment_id="77")
    await links.link(conn, links.Link("plain", "77", "email", send_as="plain"))
    # Plain-text sending is the per-segment opt-in; the sandbox judges what it receives.
    await conn.execute(
        "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) VALUES "
        "('plain', 'ok@example.com', 'add'), ('plain', 'also.ok@example.org', 'add')"
    )
    await faults(sandbox)
    summary = await sync_once(with_env(env))
    assert summary.exit_code == 0
    row = await conn.fetchrow("SELECT * FROM syncd.push_audit")
    assert row["nb_valid_identifiers"] == 2 and row["nb_invalid_identifiers"] == 0
    assert row["request_date"] is not None and row["contact_list_id"] is not None
    assert sandbox.state.segments["77"].members == {"ok@example.com", "also.ok@example.org"}


async def test_deprecated_version_is_logged(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=3)
    with capture_logs() as logs:
        summary = await sync_once(with_env(env, CRITEO_API_VERSION="2026-01"))
    assert summary.exit_code == 0
    warned = [e for e in logs if e["event"] == "criteo_api_version_deprecated"]
    assert len(warned) == 1 and warned[0]["sunset"]


async def test_logs_carry_no_identifier_or_secret(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=3)
    await faults(sandbox, script=[{"status": 503}])
    with capture_logs() as logs:
        await sync_once(with_env(env))
    text = repr(logs)
    assert "user1@example.com" not in text and sha("user1@example.com") not in text
    assert "sandbox-secret" not in text
    assert {"run_started", "segment_planned", "chunk_retry", "chunk_pushed", "run_finished"} <= {
        e["event"] for e in logs
    }
    finished = next(e for e in logs if e["event"] == "run_finished")
    assert 0 < finished["planning_s"] < finished["duration_s"]
    assert (finished["changes"], finished["chunks_acknowledged"]) == (3, 1)


async def test_chunk_taken_over_before_its_body_is_read_is_not_sent(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """The body streams from the payload only while this run owns the chunk: if another
    run took it over, the request is cut short and the push ends as lease_lost."""
    await setup_segments(conn, sandbox, count=1, per_segment=20_000)  # several slices
    settings = with_env(env, SYNCD_RETRY_BASE_S="0.01")
    run_ids = [
        await conn.fetchval(
            "INSERT INTO syncd.sync_runs (host, pid, target_window) "
            "VALUES ('t', 1, now()) RETURNING id"
        )
        for _ in range(2)
    ]
    pool = await create_pool(settings)
    try:
        async with pool.acquire() as pconn:
            await plan_segment(pconn, run_ids[0], "s0", "email", "sha256", 50_000)
        async with CriteoClient.open(settings) as client:
            pusher = Pusher(pool, client, settings, run_ids[0])
            chunk = await pusher.claim()
            assert chunk is not None and chunk.payload_bytes > PAYLOAD_SLICE_BYTES
            renew = pusher._renew_lease

            async def renewed_then_taken_over(c: Any) -> bool:
                # The race: the lease is renewed, then another run takes the chunk
                # before the upload reads its payload.
                ok = await renew(c)
                await conn.execute(
                    "UPDATE syncd.chunks SET owner_run_id = $2 WHERE id = $1", c.id, run_ids[1]
                )
                return ok

            pusher._renew_lease = renewed_then_taken_over  # type: ignore[method-assign]
            assert await pusher.push(chunk) == "lease_lost"
    finally:
        await pool.close()
    assert sandbox.state.stats()["amendments_applied"] == 0
    assert sandbox.state.segments["1000"].members == set()
    outcomes = await conn.fetch("SELECT outcome FROM syncd.push_audit")
    assert [r["outcome"] for r in outcomes] == ["lease_lost"]


async def test_a_lost_database_mid_run_is_reported_as_itself(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str], monkeypatch: Any
) -> None:
    """An error inside the run's task groups surfaces as the error itself (for the CLI's
    one line), and the run row records it."""
    await setup_segments(conn, sandbox, count=1, per_segment=10)

    async def lost(self: Pusher) -> None:
        raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle")

    monkeypatch.setattr(Pusher, "claim", lost)
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await sync_once(with_env(env))
    run = await conn.fetchrow("SELECT status, error FROM syncd.sync_runs")
    assert run["status"] == "failed"
    assert run["error"] == "ConnectionDoesNotExistError: connection was closed in the middle"
