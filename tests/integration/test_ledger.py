"""The ledger: per Criteo segment, the identifiers (as sent) Criteo has acknowledged.

Its log is the acknowledged chunks, kept in the same statement as each chunk's outcome
and audit row, so it holds exactly what Criteo accepted: never a chunk that failed, never
one whose lease another run took over. Runs fold the log into syncd.ledger after their
last chunk, in plan order. Mirror diffs, resync, verification and erasure all read it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from syncd import ledger as ledger_module
from syncd.db import locks, query
from syncd.plan import plan_segment
from syncd.sandbox import RunningSandbox
from syncd.sync import sync_once
from tests.helpers import control, insert_changes, insert_generated_changes, wait_until
from tests.integration.test_push import pushing, setup_segments, with_env


async def ledger(conn: Any, segment_id: str, api: str = "retail-media") -> set[str]:
    """What the ledger holds now: as readers do, fold first."""
    await ledger_module.fold(conn)
    return await folded(conn, segment_id, api)


async def folded(conn: Any, segment_id: str, api: str = "retail-media") -> set[str]:
    """What the ledger table holds, without folding."""
    rows = await conn.fetch(
        "SELECT identifier FROM syncd.ledger_members WHERE api = $1 AND criteo_segment_id = $2",
        api,
        segment_id,
    )
    return {r["identifier"] for r in rows}


async def test_the_ledger_holds_what_criteo_holds_after_adds_and_removes(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    for api in ("retail-media", "marketing-solutions"):
        await setup_segments(conn, sandbox, count=1, per_segment=0, api=api)
        segment_id = "1000"
        await insert_generated_changes(conn, "s0", 250)
        settings = with_env(env, SYNCD_CHUNK_SIZE="100")
        assert (await sync_once(settings)).exit_code == 0
        assert await ledger(conn, segment_id, api) == sandbox.state.segments[segment_id].members
        assert len(await ledger(conn, segment_id, api)) == 250

        await insert_generated_changes(conn, "s0", 120, "remove")
        await insert_changes(conn, [("s0", "late@example.com", "add")])
        assert (await sync_once(settings)).exit_code == 0
        members = sandbox.state.segments[segment_id].members
        assert len(members) == 131
        assert await ledger(conn, segment_id, api) == members
        await conn.execute("DELETE FROM syncd.segments")
        await conn.execute("DELETE FROM syncd.ledger")
        sandbox.state.segments.clear()


async def test_a_chunk_criteo_refused_never_reaches_the_ledger(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=300)
    await control(sandbox, "POST", "faults", {"script": [{"status": 400}]})
    summary = await sync_once(with_env(env, SYNCD_CHUNK_SIZE="100"))
    assert (summary.chunks_acknowledged, summary.chunks_failed) == (2, 1)
    members = sandbox.state.segments["1000"].members
    assert len(members) == 200
    assert await ledger(conn, "1000") == members


async def test_a_finish_fenced_out_by_a_takeover_writes_no_ledger_row(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=10)
    async with pushing(conn, with_env(env)) as p:
        chunk = await p.pusher.claim()
        assert chunk is not None
        await conn.execute(
            "UPDATE syncd.chunks SET owner_run_id = $2 WHERE id = $1", chunk.id, p.run_ids[1]
        )
        written = await conn.fetchval(
            query("finish_chunk"),
            chunk.id,
            p.run_ids[0],
            "done",
            0.0,
            *[None] * 5,
            "",
            "acknowledged",
            *[None] * 5,
            None,
        )
        assert written is None
    assert await ledger(conn, "1000") == set()


async def test_packing_an_identifier_is_lossless_and_hashes_take_half_the_room(conn: Any) -> None:
    samples = [
        "a" * 64,
        "0123456789abcdef" * 4,  # a SHA-256
        "0123456789abcdef" * 2,  # an MD5
        "ABCDEF",  # upper-case hex is not how syncd sends hashes: kept as text
        "abc",  # odd length
        "+33612345678",
        "6f0c-ad1d-madid",
        "zoë@exämple.com",
        "00",
    ]
    for value in samples:
        back = await conn.fetchval("SELECT syncd.ledger_unpack(syncd.ledger_pack($1))", value)
        assert back == value
    assert await conn.fetchval("SELECT octet_length(syncd.ledger_pack($1))", "ab" * 32) == 33


async def new_run(conn: Any) -> int:
    return int(
        await conn.fetchval(
            "INSERT INTO syncd.sync_runs (host, pid, target_window) "
            "VALUES ('t', 1, now()) RETURNING id"
        )
    )


async def test_the_fold_applies_plans_in_their_order(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """Three plans of one segment acknowledged before one fold: an add then a remove
    leaves nothing, a remove then an add leaves the identifier."""
    await setup_segments(conn, sandbox, count=1, per_segment=0)
    plans = [
        [("s0", "x@example.com", "add"), ("s0", "y@example.com", "remove")],
        [("s0", "x@example.com", "remove"), ("s0", "y@example.com", "add")],
        [("s0", "z@example.com", "add")],
    ]
    run_id = await new_run(conn)
    for changes in plans:
        await insert_changes(conn, changes)
        await plan_segment(conn, run_id, "s0", 50_000)
    summary = await sync_once(with_env(env))
    assert summary.chunks_acknowledged == 5
    members = sandbox.state.segments["1000"].members
    assert len(members) == 2
    assert await ledger(conn, "1000") == members


async def test_acknowledged_chunks_wait_for_a_fold_and_prune_spares_them(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that stops after its last chunk and before its fold (a crash) leaves the log:
    the next fold applies it, and history is not pruned from under it."""
    await setup_segments(conn, sandbox, count=1, per_segment=0)
    monkeypatch.setattr(ledger_module, "FOLD_BATCH_CHUNKS", 2)  # several batches
    async with pushing(conn, with_env(env)) as p:
        await insert_generated_changes(conn, "s0", 30)
        await plan_segment(conn, p.run_ids[0], "s0", 5)
        while (chunk := await p.pusher.claim()) is not None:
            assert await p.pusher.push(chunk) == "acknowledged"
        assert await folded(conn, "1000") == set()
        await conn.execute("UPDATE syncd.plans SET created_at = now() - interval '2 days'")
        await conn.fetchrow(query("prune_history"), 1)
        assert await conn.fetchval("SELECT count(*) FROM syncd.chunks") == 6  # all kept
        done = await ledger_module.fold(conn)
        assert (done.chunks, done.added, done.removed) == (6, 30, 0)
        assert await ledger(conn, "1000") == sandbox.state.segments["1000"].members
        assert (await conn.fetchrow(query("prune_history"), 1))["plans"] == 1
        assert await conn.fetchval("SELECT count(*) FROM syncd.chunks") == 0
        assert (await ledger_module.fold(conn)).chunks == 0


async def test_a_fold_waits_for_the_one_under_way(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """One fold at a time (an add and its later remove must not be applied out of order
    by two folds at once): a fold started while another holds the lock waits for it."""
    await setup_segments(conn, sandbox, count=1, per_segment=3)
    async with pushing(conn, with_env(env)) as p:
        chunk = await p.pusher.claim()
        assert chunk is not None and await p.pusher.push(chunk) == "acknowledged"
        async with p.pool.acquire() as holder, holder.transaction():
            await holder.execute(query("lock_ledger_fold"), locks.LEDGER_LOCK_NAMESPACE, locks.FOLD)
            folder = await p.pool.acquire()
            folding = asyncio.create_task(ledger_module.fold(folder))

            async def waiting() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND NOT granted AND classid = $1",
                        locks.LEDGER_LOCK_NAMESPACE,
                    )
                )

            await wait_until(waiting, 10, "the second fold to wait for the lock")
            assert await folded(conn, "1000") == set()
        assert (await folding).added == 3
        await p.pool.release(folder)
    assert len(await ledger(conn, "1000")) == 3


async def test_a_run_folds_what_earlier_runs_left_before_it_plans(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """`syncd sync` leaves its own acknowledged chunks unfolded (off the path to Criteo);
    the next run folds them first."""
    await setup_segments(conn, sandbox, count=1, per_segment=40)
    settings = with_env(env, SYNCD_CHUNK_SIZE="10")
    assert (await sync_once(settings)).chunks_acknowledged == 4
    assert await folded(conn, "1000") == set()
    assert (await sync_once(settings)).chunks_acknowledged == 0
    assert await folded(conn, "1000") == sandbox.state.segments["1000"].members
