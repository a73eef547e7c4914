"""Clear chunks: queueing one, the layer under `syncd resync` (issue 13).

A clear empties a segment's list on Criteo (the segment stays). It goes through the
outbox like an add or a remove: claimed with a lease, sent with retries and the app's
pacing, finished with its audit row, folded into the ledger (where it empties the
target's ledger at its place in plan order). It is a plan of its own, with one chunk:
`claim_chunk` sends a segment's plans in order, so the clear waits for every chunk planned
before it, and the adds planned after it wait for the clear. A resync writes the clear
and the adds after it in ONE transaction, so a crash leaves both or neither; once
committed, each chunk is pushed (again, after a crash) until acknowledged, in order.

The caller holds the segment's plan lock (`plan_lock`) around that transaction, as
`plan.plan_segment` does around each plan: it is a SESSION advisory lock, taken before the
transaction begins, so that plans of one segment are serialised (plan ids then order them)
and the transaction's snapshot sees what the segment's previous plan consumed. A
transaction-scoped lock would be taken after the snapshot in REPEATABLE READ.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from syncd.db import query
from syncd.errors import SyncdError


@asynccontextmanager
async def plan_lock(conn: Any, segment_key: str) -> AsyncIterator[None]:
    """Hold the segment's plan lock (the one plan_segment takes) on `conn` for the block:
    open the transaction that queues a clear inside it, never around it."""
    await conn.execute(query("lock_segment_plan"), segment_key)
    try:
        yield
    finally:
        await conn.execute(query("unlock_segment_plan"), segment_key)


async def queue_clear(conn: Any, run_id: int | None, link: Mapping[str, Any]) -> int:
    """Write a plan with one clear chunk for `link`'s target, in the caller's transaction,
    and return the plan's id. `link` is the segment's link as `lock_link_for_plan` reads
    (and locks) it: the chunk records its whole target, like every planned chunk.
    `run_id` None: queued outside a run (from the command line); the run that pushes the
    clear names itself in its audit row.

    Refused unless `conn` is in a transaction and holds the segment's plan lock
    (`plan_lock`): without them, a plan of the segment running at the same time could
    take a plan id before this one and commit after it."""
    segment_key = link["segment_key"]
    if not conn.is_in_transaction():
        raise SyncdError("a clear is queued inside the caller's transaction")
    if not await conn.fetchval(query("holds_segment_plan_lock"), segment_key):
        raise SyncdError(f"queueing a clear of {segment_key!r} needs its plan lock (plan_lock)")
    plan_id: int = await conn.fetchval(query("create_plan"), run_id, segment_key)
    await conn.execute(
        query("insert_clear_chunk"),
        plan_id,
        segment_key,
        link["identifier_type"],
        link["api"],
        link["criteo_segment_id"],
        link["account_id"],
        link["gum_caller_id"],
        link["send_as"],
        link["app"],
    )
    await conn.execute(query("record_plan"), plan_id, 0, 0, 0, 0, 1, 0)
    return plan_id
