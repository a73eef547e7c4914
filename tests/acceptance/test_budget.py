"""Acceptance: two `syncd sync` processes pushing for one app at once share its budget."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from syncd.sandbox import RunningSandbox
from tests.helpers import control, insert_changes, link_segment, run_cli

pytestmark = pytest.mark.timeout(120)


async def test_two_processes_pushing_for_one_app_stay_within_its_budget(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    """A bucket of 2 calls refilling at 600 a minute; two `syncd sync` processes started
    together each push part of 32 chunks. Each alone would pace to the whole budget; they
    share it through PostgreSQL, and the sandbox refuses none of their calls."""
    for n in range(4):
        await link_segment(env, sandbox, f"s{n}", str(1000 + n))
        rows = [(f"s{n}", f"user{i}@example.com", "add") for i in range(80)]
        await insert_changes(conn, rows)
    budget = {"rate_limit_per_minute": 600, "rate_limit_mode": "bucket", "rate_limit_burst": 2}
    await control(sandbox, "POST", "faults", budget)
    both = {**env, "SYNCD_CHUNK_SIZE": "10", "SYNCD_CONCURRENCY": "4"}
    first, second = await asyncio.gather(run_cli(both, "sync"), run_cli(both, "sync"))
    assert (first.code, second.code) == (0, 0), (first, second)
    answers = dict(sandbox.state.requests.get("rm_add_remove", {}))
    assert answers == {"200": 32}
    runs = await conn.fetch(
        "SELECT run_id, count(*) AS chunks FROM syncd.push_audit GROUP BY run_id"
    )
    assert len(runs) == 2, runs  # both processes pushed
