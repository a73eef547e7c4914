"""Criteo's call budget against the sandbox enforcing one: pacing from its headers."""

from __future__ import annotations

from typing import Any

from syncd.sandbox import RunningSandbox
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
