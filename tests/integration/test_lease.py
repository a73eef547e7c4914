"""The lease fence and per-segment order, driven at the claim level (Pusher against the real
PostgreSQL and the sandbox), so that each guarantee fails a test when its SQL is removed:
the finalise's fence, takeover after a lease runs out, releasing a run's claims, and a
later plan of a segment waiting for the earlier one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg

from syncd.config import Settings
from syncd.criteo import CriteoClient
from syncd.db import create_pool, query
from syncd.plan import plan_segment
from syncd.push import Pusher
from syncd.sandbox import RunningSandbox
from tests.helpers import control, link_in_process


async def live_run(database_url: str) -> tuple[Any, int]:
    """A run row whose liveness lock is held, as a running `syncd sync` holds it."""
    lock_conn = await asyncpg.connect(database_url)
    run_id = await lock_conn.fetchval(
        "INSERT INTO syncd.sync_runs (host, pid, target_window) VALUES ('t', 1, now()) RETURNING id"
    )
    await lock_conn.execute(query("hold_run_lock"), run_id)
    return lock_conn, int(run_id)


async def plan_changes(
    pool: Any, run_id: int, key: str, rows: Iterable[tuple[str, str]], chunk_size: int
) -> None:
    """Insert (identifier, operation) changes of one segment, then plan them as one plan."""
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
            "VALUES ($1, $2, $3)",
            [(key, identifier, operation) for identifier, operation in rows],
        )
        await plan_segment(conn, run_id, key, chunk_size)


@asynccontextmanager
async def held_answers(
    settings: Settings, answered: asyncio.Event, release: asyncio.Event
) -> AsyncIterator[CriteoClient]:
    """A Criteo client whose amendment answers wait, once Criteo has answered, until the test
    releases them: 'a request still in flight' at a moment the test chooses, with no sleep."""

    async def on_request_end(_: Any, __: Any, params: aiohttp.TraceRequestEndParams) -> None:
        if "/contact-list/" in str(params.url):
            answered.set()
            await release.wait()

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    async with aiohttp.ClientSession(
        trace_configs=[trace], timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        yield CriteoClient(settings, session)


@asynccontextmanager
async def pushers(
    database_url: str, settings: Settings, clients: list[CriteoClient]
) -> AsyncIterator[tuple[Any, list[tuple[Pusher, int]]]]:
    """A pool and one Pusher per client, each for a live run of its own."""
    pool = await create_pool(settings)
    runs = [await live_run(database_url) for _ in clients]
    try:
        yield (
            pool,
            [
                (Pusher(pool, client, settings, run_id), run_id)
                for client, (_, run_id) in zip(clients, runs, strict=True)
            ],
        )
    finally:
        for lock_conn, _ in runs:
            await lock_conn.close()
        await pool.close()


async def chunk_row(conn: Any, chunk_id: int) -> dict[str, Any]:
    return dict(await conn.fetchrow("SELECT * FROM syncd.chunks WHERE id = $1", chunk_id))


async def test_a_late_finish_after_the_lease_ran_out_changes_nothing(
    conn: Any, database_url: str, sandbox: RunningSandbox, settings: Settings
) -> None:
    """Run A's request is slow; its lease runs out; run B takes the chunk over and has it
    acknowledged; A's answer then arrives: A writes a `lease_lost` audit row and nothing
    else (the finalise is fenced by the lease)."""
    await link_in_process(conn, sandbox, "vip", "1001")
    answered, release = asyncio.Event(), asyncio.Event()
    async with (
        held_answers(settings, answered, release) as slow,
        CriteoClient.open(settings) as fast,
        pushers(database_url, settings, [slow, fast]) as (pool, [(a, run_a), (b, run_b)]),
    ):
        await plan_changes(pool, run_a, "vip", [("x@example.com", "add")], 50_000)
        chunk = await a.claim()
        assert chunk is not None
        assert await b.claim() is None  # A's lease is current: nothing for B
        pushing = asyncio.create_task(a.push(chunk))
        await answered.wait()  # Criteo answered A; A has not read the answer yet
        # A's lease runs out while it waits (as if the answer took longer than the lease).
        await conn.execute(
            "UPDATE syncd.chunks SET lease_until = now() - interval '1 second' WHERE id = $1",
            chunk.id,
        )
        taken = await b.claim()  # takeover once the lease has run out
        assert taken is not None and taken.id == chunk.id
        assert await b.push(taken) == "acknowledged"
        before = await chunk_row(conn, chunk.id)
        release.set()
        assert await pushing == "lease_lost"
    assert await chunk_row(conn, chunk.id) == before
    assert before["state"] == "done" and before["owner_run_id"] is None
    audit = await conn.fetch("SELECT run_id, chunk_id, outcome FROM syncd.push_audit ORDER BY id")
    assert [tuple(r) for r in audit] == [
        (run_b, chunk.id, "acknowledged"),
        (run_a, chunk.id, "lease_lost"),
    ]
    assert [e["status"] for e in sandbox.state.log] == [200, 200]


async def test_a_live_runs_claim_is_taken_over_only_after_its_lease_runs_out(
    conn: Any, database_url: str, sandbox: RunningSandbox, settings: Settings
) -> None:
    await link_in_process(conn, sandbox, "vip", "1001")
    async with (
        CriteoClient.open(settings) as client,
        pushers(database_url, settings, [client, client]) as (pool, [(a, run_a), (b, run_b)]),
    ):
        await plan_changes(pool, run_a, "vip", [("x@example.com", "add")], 50_000)
        chunk = await a.claim()
        assert chunk is not None
        assert await b.claim() is None
        await conn.execute("UPDATE syncd.chunks SET lease_until = now() - interval '1 second'")
        taken = await b.claim()
        assert taken is not None and taken.id == chunk.id
        row = await chunk_row(conn, chunk.id)
        assert (row["state"], row["owner_run_id"]) == ("claimed", run_b)
        assert row["lease_until"] > await conn.fetchval("SELECT now()")
        # A, its lease lost, may no longer send it: no request, a lease_lost audit row.
        assert await a.push(chunk) == "lease_lost"
    assert len(sandbox.state.log) == 0


async def test_a_stopping_run_releases_its_claims_and_only_its_own(
    conn: Any, database_url: str, sandbox: RunningSandbox, settings: Settings
) -> None:
    await link_in_process(conn, sandbox, "vip", "1001")
    async with (
        CriteoClient.open(settings) as client,
        pushers(database_url, settings, [client, client]) as (pool, [(a, run_a), (b, run_b)]),
    ):
        adds = [(f"u{i}@example.com", "add") for i in range(3)]
        await plan_changes(pool, run_a, "vip", adds, 1)
        mine = [await a.claim(), await a.claim()]
        theirs = await b.claim()
        assert None not in mine and theirs is not None
        assert await a.release() == 2
    rows = await conn.fetch("SELECT id, state, owner_run_id, lease_until FROM syncd.chunks")
    by_id = {r["id"]: (r["state"], r["owner_run_id"], r["lease_until"] is None) for r in rows}
    for chunk in mine:
        assert chunk is not None
        assert by_id[chunk.id] == ("pending", None, True)
    assert by_id[theirs.id] == ("claimed", run_b, False)


async def test_a_later_plans_chunk_waits_until_the_earlier_plan_is_done(
    conn: Any, database_url: str, sandbox: RunningSandbox, settings: Settings
) -> None:
    """Order per segment, at the claim: plan 1 adds x and y (two chunks, which may go in
    parallel), plan 2 removes x; plan 2's chunk is claimable only once both of plan 1's
    chunks are done, a failed one included. Another segment is not held up."""
    await link_in_process(conn, sandbox, "vip", "1001")
    await link_in_process(conn, sandbox, "other", "1002")
    async with (
        CriteoClient.open(settings) as client,
        pushers(database_url, settings, [client]) as (pool, [(pusher, run_id)]),
    ):
        await plan_changes(pool, run_id, "vip", [("x@x.com", "add"), ("y@x.com", "add")], 1)
        await plan_changes(pool, run_id, "vip", [("x@x.com", "remove")], 1)
        first, second = await pusher.claim(), await pusher.claim()
        assert first is not None and second is not None
        assert {first.operation, second.operation} == {"add"}
        assert first.plan_id == second.plan_id
        assert await pusher.claim() is None  # plan 2 waits for both of plan 1's chunks

        await plan_changes(pool, run_id, "other", [("z@x.com", "remove")], 1)
        other = await pusher.claim()  # another segment's later plan does not wait
        assert other is not None and other.segment_key == "other"

        assert await pusher.push(first) == "acknowledged"
        assert await pusher.claim() is None  # `second` is still open
        await control(sandbox, "POST", "faults", {"script": [{"status": 400}]})
        assert await pusher.push(second) == "failed"
        assert await pusher.claim() is None  # failed is not done: the order holds
        await conn.execute(query("rearm_failed_chunks"))
        again = await pusher.claim()
        assert again is not None and again.id == second.id
        assert await pusher.push(again) == "acknowledged"
        later = await pusher.claim()
        assert later is not None and later.operation == "remove"
        assert later.plan_id > first.plan_id
