"""The daemon's HTTP server against a real PostgreSQL and the sandbox: /healthz, /readyz,
/metrics after a real sync. Counters are process-wide, so the tests compare deltas."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from syncd.config import Settings
from syncd.daemon import server
from syncd.daemon.metrics import READY, REGISTRY
from syncd.daemon.server import http_server
from syncd.db import close_pool, create_pool
from syncd.sandbox import RunningSandbox
from syncd.sync import sync_once
from tests.integration.test_push import faults, pushing, setup_segments, with_env


@asynccontextmanager
async def serving(pool: Any, alive: Callable[[], bool] = lambda: True) -> AsyncIterator[str]:
    async with http_server(pool, alive=alive, host="127.0.0.1", port=0) as port:
        assert port > 0
        yield f"http://127.0.0.1:{port}"


async def get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[Any]:
    pool = await create_pool(settings)
    try:
        yield pool
    finally:
        await close_pool(pool)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_healthz_follows_alive(pool: Any) -> None:
    alive = True
    async with serving(pool, lambda: alive) as base:
        assert (await get(f"{base}/healthz"))[0] == 200
        alive = False
        assert (await get(f"{base}/healthz"))[0] == 503
        alive = True
        assert (await get(f"{base}/healthz"))[0] == 200


async def test_readyz_when_the_database_answers_and_migrations_are_current(pool: Any) -> None:
    async with serving(pool) as base:
        status, _, text = await get(f"{base}/readyz")
    assert status == 200, text
    assert value("syncd_ready") == 1


async def test_readyz_503_when_migrations_are_behind(pool: Any, conn: Any) -> None:
    await conn.execute(
        "DELETE FROM syncd.schema_migrations "
        "WHERE version = (SELECT max(version) FROM syncd.schema_migrations)"
    )
    async with serving(pool) as base:
        status, _, text = await get(f"{base}/readyz")
        assert status == 503
        assert "1 migration(s) pending" in text
        # The scrape still answers, saying not ready.
        status, _, metrics = await get(f"{base}/metrics")
    assert status == 200
    assert samples(metrics)[("syncd_ready", ())] == 0


async def test_readyz_503_when_the_database_is_unreachable() -> None:
    url = f"postgresql://syncd:very-secret-pw@127.0.0.1:{free_port()}/nowhere"
    pool = await asyncpg.create_pool(url, min_size=0)
    try:
        async with serving(pool) as base:
            READY.set(1)  # as a good scrape left it: the scrape itself must notice
            status, _, metrics = await get(f"{base}/metrics")
            assert status == 200
            assert samples(metrics)[("syncd_ready", ())] == 0
            status, _, text = await get(f"{base}/readyz")
        assert status == 503
        assert "database unreachable" in text
        assert "very-secret-pw" not in text and "nowhere" not in text
    finally:
        await pool.close()


async def test_a_database_that_never_answers_is_not_ready_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A server that accepts connections and never says a word: only the bound ends the wait.
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    mute = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = mute.sockets[0].getsockname()[1]
    monkeypatch.setattr(server, "PROBE_TIMEOUT_S", 0.3)
    pool = await asyncpg.create_pool(f"postgresql://u@127.0.0.1:{port}/x", min_size=0)
    try:
        async with serving(pool) as base:
            status, _, text = await asyncio.wait_for(get(f"{base}/readyz"), 10)
            assert (status, text) == (503, "not ready: the database did not answer in time")
            status, _, _ = await asyncio.wait_for(get(f"{base}/metrics"), 10)
            assert status == 200
    finally:
        pool.terminate()
        for writer in held:
            writer.close()
        mute.close()
        await mute.wait_closed()


async def test_metrics_after_a_real_sync(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str], pool: Any
) -> None:
    await setup_segments(conn, sandbox, count=2, per_segment=150)
    # One plain 503 (a server error, retried) and one stale version announcing its sunset.
    await faults(sandbox, script=[{"status": 503}])
    settings = with_env(env, SYNCD_CHUNK_SIZE="100", CRITEO_API_VERSION="2026-01")
    pushed = value("syncd_chunks_pushed_total", app="default", outcome="acknowledged")
    sent = value("syncd_identifiers_sent_total", segment="s0", operation="add")
    valid = value("syncd_identifiers_valid_total", segment="s1")
    invalid = value("syncd_identifiers_invalid_total", segment="s1")
    requests = value("syncd_request_duration_seconds_count", app="default")
    retries = value("syncd_request_retries_total", app="default", reason="server_error")

    summary = await sync_once(settings)
    assert summary.exit_code == 0 and summary.chunks_acknowledged == 4

    # The gauges are the database's view at scrape time: one chunk failing, one pending.
    await conn.execute(
        "UPDATE syncd.chunks SET state = CASE WHEN id = (SELECT min(id) FROM syncd.chunks) "
        "THEN 'failed' ELSE 'pending' END "
        "WHERE id IN (SELECT id FROM syncd.chunks ORDER BY id LIMIT 2)"
    )
    await conn.execute(  # as the mass-removal guard records a block
        "UPDATE syncd.segments SET blocked_at = now(), blocked_removes = 9, blocked_members = 10 "
        "WHERE segment_key = 's0'"
    )
    async with serving(pool) as base:
        status, content_type, text = await get(f"{base}/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    got = samples(text)

    def delta(name: str, before: float, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))] - before

    assert delta("syncd_chunks_pushed_total", pushed, app="default", outcome="acknowledged") == 4
    assert delta("syncd_identifiers_sent_total", sent, segment="s0", operation="add") == 150
    assert delta("syncd_identifiers_valid_total", valid, segment="s1") == 150
    assert delta("syncd_identifiers_invalid_total", invalid, segment="s1") == 0
    # The token request, four acknowledged requests and the one answered 503, each timed.
    assert delta("syncd_request_duration_seconds_count", requests, app="default") == 6
    assert delta("syncd_request_retries_total", retries, app="default", reason="server_error") == 1
    assert got[("syncd_api_sunset_timestamp_seconds", (("version", "2026-01"),))] == 1801008000
    assert got[("syncd_chunks_pending", ())] == 1
    assert got[("syncd_chunks_failed", ())] == 1
    assert got[("syncd_segments_blocked", ())] == 1
    assert got[("syncd_ready", ())] == 1
    # What labels carry: names an operator chose, never an identifier, a URL or a secret.
    values = {v for (_, labels) in got for _, v in labels}
    for forbidden in ("user1@example.com", hashlib.sha256(b"user1@example.com").hexdigest()):
        assert not any(forbidden in v for v in values)
    assert not any("sandbox-secret" in v or "://" in v or "@" in v for v in values)


async def test_outcomes_and_fault_retries_are_counted_by_kind(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=10)
    # One sender, so the script meets the chunk in order: a dropped connection, a stall
    # past the timeout, a 413 (split in two), then the halves go through.
    await faults(sandbox, script=[{"drop": "before"}, {"stall_s": 1.5}, {"status": 413}])
    settings = with_env(env, SYNCD_CONCURRENCY="1", SYNCD_HTTP_TIMEOUT_S="1")
    outcomes = ("acknowledged", "split", "failed")
    before = {o: value("syncd_chunks_pushed_total", app="default", outcome=o) for o in outcomes}
    reasons = ("connection", "timeout", "server_error")
    retried = {r: value("syncd_request_retries_total", app="default", reason=r) for r in reasons}

    assert (await sync_once(settings)).exit_code == 0
    await conn.execute(
        "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
        "VALUES ('s0', 'late@example.com', 'add')"
    )
    await faults(sandbox, script=[{"status": 503}] * 3)
    assert (await sync_once(with_env(env, SYNCD_MAX_ATTEMPTS="3"))).exit_code == 1

    assert {
        o: value("syncd_chunks_pushed_total", app="default", outcome=o) - before[o]
        for o in outcomes
    } == {
        "acknowledged": 2,
        "split": 1,
        "failed": 1,
    }
    # The third 503 is the last attempt: failed, not retried.
    assert {
        r: value("syncd_request_retries_total", app="default", reason=r) - retried[r]
        for r in reasons
    } == {"connection": 1, "timeout": 1, "server_error": 2}


async def test_closing_is_bounded_with_a_scrape_stuck_on_the_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held: list[asyncio.StreamWriter] = []
    connected = asyncio.Event()

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        connected.set()

    mute = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = mute.sockets[0].getsockname()[1]
    monkeypatch.setattr(server, "PROBE_TIMEOUT_S", 120.0)  # only the close can end it
    pool = await asyncpg.create_pool(f"postgresql://u@127.0.0.1:{port}/x", min_size=0)
    scrape: asyncio.Task[Any] | None = None
    try:
        async with serving(pool) as base:
            scrape = asyncio.create_task(get(f"{base}/metrics"))
            await asyncio.wait_for(connected.wait(), 10)  # the probe is stuck in the database
            closing = time.monotonic()
        assert time.monotonic() - closing < server.CLOSE_TIMEOUT_S + 1
    finally:
        if scrape is not None:
            scrape.cancel()
            await asyncio.gather(scrape, return_exceptions=True)
        pool.terminate()
        for writer in held:
            writer.close()
        mute.close()
        await mute.wait_closed()


async def test_a_chunk_taken_over_counts_as_lease_lost(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=3)
    before = value("syncd_chunks_pushed_total", app="default", outcome="lease_lost")
    async with pushing(conn, with_env(env)) as p:
        chunk = await p.pusher.claim()
        assert chunk is not None
        # Another run took the chunk over before this one sent it.
        await conn.execute(
            "UPDATE syncd.chunks SET owner_run_id = $2 WHERE id = $1", chunk.id, p.run_ids[1]
        )
        assert await p.pusher.push(chunk) == "lease_lost"
    after = value("syncd_chunks_pushed_total", app="default", outcome="lease_lost")
    assert after - before == 1
