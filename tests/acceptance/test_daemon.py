"""Acceptance: `syncd run` (the daemon) as a subprocess against the sandbox and PostgreSQL.

Each daemon is given a window a few minutes ahead and a lead that covers now, so by the
late-start rule its run fires at once: no test waits for a clock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import socket
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from syncd.sandbox import RunningSandbox
from tests.acceptance.test_cli import (
    acknowledged_per_chunk,
    chunk_states,
    emails,
    requests_by_key,
    set_latency,
)
from tests.helpers import (
    Change,
    Cli,
    cli_env,
    expected_members,
    insert_changes,
    link_segment,
    members,
    run_cli,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)


def daemon_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    """A window 30 minutes ahead and a 60-minute lead: its run is due at start."""
    window = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30)
    return {
        **env,
        "SYNCD_WINDOWS_UTC": window.strftime("%H:%M"),
        "SYNCD_LEAD_MINUTES": "60",
        "SYNCD_HTTP_PORT": "0",
        "SYNCD_LOG_LEVEL": "info",
        **extra,
    }


async def runs(conn: Any) -> list[Any]:
    return list(await conn.fetch("SELECT * FROM syncd.sync_runs ORDER BY id"))


async def seed(env: dict[str, str], conn: Any, sandbox: RunningSandbox, n: int) -> list[Change]:
    await link_segment(env, sandbox, "vip", "1001")
    changes: list[Change] = [("vip", e, "add") for e in emails("u", n)]
    await insert_changes(conn, changes)
    return changes


async def test_sigterm_mid_push_exits_0_and_loses_nothing(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    env = daemon_env(env, SYNCD_CHUNK_SIZE="100", SYNCD_CONCURRENCY="2")
    changes = await seed(env, conn, sandbox, 2_000)  # 20 chunks
    await set_latency(sandbox, 700)
    daemon = await Cli.start(env, "run")

    async def first_applied() -> bool:
        return sandbox.state.amendments_applied >= 1

    await wait_until(first_applied, 20, "the first amendment")
    signalled = time.monotonic()
    daemon.signal(signal.SIGTERM)
    stopped = await daemon.finish(15)
    assert stopped.code == 0, stopped
    assert time.monotonic() - signalled <= 5.0  # the requests in flight, not the grace
    assert '"event": "shutdown_started"' in stopped.stdout, stopped
    assert '"event": "window_missed"' not in stopped.stdout, stopped  # still ahead
    [run] = await runs(conn)
    assert run["status"] == "interrupted" and run["trigger"] == "window"
    assert run["slot"].startswith("window:")
    states = await chunk_states(conn)
    assert "claimed" not in states and sum(states.values()) == 20, states
    assert sandbox.state.in_flight == 0

    # Restarted before its window: the interrupted run's slot is free, the daemon runs it.
    await set_latency(sandbox, 0)
    again = await Cli.start(env, "run")

    async def rerun_succeeded() -> bool:
        return bool(
            await conn.fetchval("SELECT count(*) FROM syncd.sync_runs WHERE status = 'succeeded'")
        )

    await wait_until(rerun_succeeded, 30, "the slot's run again, to success")
    again.signal(signal.SIGTERM)
    assert (await again.finish(15)).code == 0
    assert await chunk_states(conn) == {"done": 20}
    acks = await acknowledged_per_chunk(conn)
    assert set(acks.values()) == {1}, acks
    assert max(requests_by_key(sandbox).values()) == 1  # nothing sent twice
    assert members(sandbox, "1001") == expected_members(changes, "vip")
    first, second = await runs(conn)
    assert second["slot"] == first["slot"] and second["status"] == "succeeded"
    assert second["made_window"] is True


async def test_two_daemons_run_a_slot_once_and_push_each_chunk_once(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    env = daemon_env(env, SYNCD_CHUNK_SIZE="100", SYNCD_CONCURRENCY="4")
    changes = await seed(env, conn, sandbox, 3_000)  # 30 chunks
    await set_latency(sandbox, 100)
    daemons = await asyncio.gather(Cli.start(env, "run"), Cli.start(env, "run"))

    async def slot_run_succeeded() -> bool:
        return bool(
            await conn.fetchval("SELECT count(*) FROM syncd.sync_runs WHERE status = 'succeeded'")
        )

    await wait_until(slot_run_succeeded, 40, "the slot's run to succeed")
    for daemon in daemons:
        daemon.signal(signal.SIGTERM)
    results = [await d.finish(15) for d in daemons]
    assert [r.code for r in results] == [0, 0], results
    rows = await runs(conn)
    assert len(rows) == 1 and rows[0]["status"] == "succeeded", rows
    assert sum('"event": "run_started"' in r.stdout for r in results) == 1
    assert sum('"event": "slot_taken_elsewhere"' in r.stdout for r in results) <= 1
    assert await chunk_states(conn) == {"done": 30}
    assert set((await acknowledged_per_chunk(conn)).values()) == {1}
    sent = requests_by_key(sandbox)
    assert sent == Counter({key: 1 for key in sent}) and len(sent) == 30
    assert members(sandbox, "1001") == expected_members(changes, "vip")


async def test_check_exit_codes(env: dict[str, str], conn: Any, sandbox: RunningSandbox) -> None:
    fresh = await run_cli(env, "check")
    assert fresh.code == 0 and fresh.stdout.startswith("ok: "), fresh
    await conn.execute(
        "INSERT INTO syncd.sync_runs (host, pid, target_window, status, made_window, error) "
        "VALUES ('h', 1, now() - interval '1 hour', 'succeeded', true, NULL)"
    )
    assert (await run_cli(env, "check")).code == 0
    await conn.execute(
        "INSERT INTO syncd.sync_runs (host, pid, target_window, status, made_window) "
        "VALUES ('h', 1, now() - interval '1 hour', 'succeeded', false)"
    )
    late = await run_cli(env, "check")
    assert late.code == 1 and "after its window" in late.stderr, late
    await conn.execute(
        "INSERT INTO syncd.sync_runs (host, pid, target_window, status, made_window, error) "
        "VALUES ('h', 1, now() + interval '1 hour', 'failed', false, 'boom')"
    )
    failed = await run_cli(env, "check")
    assert failed.code == 1 and "failed: boom" in failed.stderr, failed
    # An interrupted run (a shutdown) is not judged: the failed one before it still is.
    await conn.execute(
        "INSERT INTO syncd.sync_runs (host, pid, target_window, status) "
        "VALUES ('h', 1, now() + interval '1 hour', 'interrupted')"
    )
    assert (await run_cli(env, "check")).code == 1
    gone = await run_cli({**env, "SYNCD_DATABASE_URL": "postgresql://u:p@127.0.0.1:1/x"}, "check")
    assert gone.code == 1 and "unavailable" in gone.stderr, gone


async def test_requests_past_the_grace_are_cut_and_a_second_signal_exits_at_once(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    env = daemon_env(
        env,
        SYNCD_CHUNK_SIZE="100",
        SYNCD_CONCURRENCY="2",
        SYNCD_HTTP_TIMEOUT_S="15",
        SYNCD_SHUTDOWN_GRACE_S="1",
    )
    await seed(env, conn, sandbox, 1_000)
    await set_latency(sandbox, 8_000)

    async def two_in_flight() -> bool:
        return sandbox.state.in_flight == 2

    daemon = await Cli.start(env, "run")
    await wait_until(two_in_flight, 20, "two requests in flight")
    signalled = time.monotonic()
    daemon.signal(signal.SIGTERM)
    stopped = await daemon.finish(15)
    # The grace (1 s), not the 8 s requests: exit 0, the cut requests' chunks left claimed
    # for a later run to take over once none of them can still be in flight.
    assert stopped.code == 0, stopped
    assert time.monotonic() - signalled < 4.0
    assert '"event": "shutdown_cancelled_run"' in stopped.stdout, stopped
    [run] = await runs(conn)
    assert run["status"] == "interrupted"
    assert await chunk_states(conn) == {"claimed": 2, "pending": 8}

    # A second signal: out at once, whatever the grace. The slot of the interrupted run
    # is free again: this daemon runs it, sending the pending chunks.
    env["SYNCD_SHUTDOWN_GRACE_S"] = "30"
    forced = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncd",
        "run",
        env=cli_env(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert forced.stdout is not None

        async def until_logged(event: str) -> None:
            assert forced.stdout is not None
            while f'"event": "{event}"' not in (await forced.stdout.readline()).decode():
                assert forced.returncode is None, f"exited before {event}"

        async def second_run_claimed() -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) FROM syncd.chunks "
                    "WHERE state = 'claimed' AND owner_run_id <> $1",
                    run["id"],
                )
            )

        await wait_until(second_run_claimed, 20, "the second daemon's claims")
        signalled = time.monotonic()
        forced.send_signal(signal.SIGTERM)
        # The second signal once the first is handled (two at once may arrive as one).
        await asyncio.wait_for(until_logged("shutdown_started"), 10)
        forced.send_signal(signal.SIGTERM)
        await asyncio.wait_for(forced.stdout.read(), 10)
        code = await asyncio.wait_for(forced.wait(), 10)
    finally:
        if forced.returncode is None:
            forced.kill()
            await forced.wait()
    assert code == 1
    assert time.monotonic() - signalled < 3.0
    assert [r["status"] for r in await runs(conn)] == ["interrupted", "interrupted"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_daemon_serves_its_probes_and_metrics(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    """The real process on a real port: alive, ready, and /metrics with its run counted."""
    port = free_port()
    env = daemon_env(env, SYNCD_HTTP_HOST="127.0.0.1", SYNCD_HTTP_PORT=str(port))
    await seed(env, conn, sandbox, 300)
    daemon = await Cli.start(env, "run")
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:

        async def get(path: str) -> tuple[int, str]:
            try:
                async with http.get(base + path) as resp:
                    return resp.status, await resp.text()
            except aiohttp.ClientConnectionError:
                return 0, ""

        async def run_counted() -> bool:
            status, text = await get("/metrics")
            return status == 200 and 'syncd_runs_total{outcome="ok"} 1.0' in text

        await wait_until(run_counted, 30, "the run counted in /metrics")
        assert (await get("/healthz"))[0] == 200
        assert await get("/readyz") == (200, "ready")
        _, text = await get("/metrics")
        assert 'syncd_chunks_pushed_total{app="default",outcome="acknowledged"} 1.0' in text
        assert "syncd_ready 1.0" in text and "syncd_next_window_seconds" in text
        assert "syncd_last_success_timestamp_seconds 1." in text  # a real time, not 0

        # A second daemon on the same port: one line naming the setting, exit 2.
        clash = await run_cli(env, "run")
        assert clash.code == 2, clash
        assert "SYNCD_HTTP_PORT: cannot listen on 127.0.0.1" in clash.stderr, clash
    daemon.signal(signal.SIGTERM)
    assert (await daemon.finish(15)).code == 0
