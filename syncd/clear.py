"""Clear chunks: queueing one, the layer under `syncd resync` (issue 13).

A clear empties a segment's list on Criteo (the segment stays). It goes through the
outbox like an add or a remove: claimed with a lease, sent with retries and the app's
pacing, finished with its audit row, folded into the ledger (where it empties the
target's ledger at its place in plan order). It is a plan of its own, with one chunk:
`claim_chunk` sends a segment's plans in order, so the clear waits for every chunk planned
before it, and the adds planned after it wait for the clear. A resync writes the clear
and the adds after it in ONE transaction, so a crash leaves both or neither; once
committed, each chunk is pushed (again, after a crash) until acknowledged, in order.

The caller holds the segment's plan lock (`plan.plan_locks`) around that transaction, as
every writer of a segment's plans does: plans of one segment are then serialised, and
plan ids order them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from syncd.db import query
from syncd.errors import SyncdError


async def queue_clear(conn: Any, run_id: int | None, link: Mapping[str, Any]) -> int:
    """Write a plan with one clear chunk for `link`'s target, in the caller's transaction,
    and return the plan's id. `link` is the segment's link as `lock_link_for_plan` reads
    (and locks) it: the chunk records its whole target, like every planned chunk.
    `run_id` None: queued outside a run (from the command line); the run that pushes the
    clear names itself in its audit row.

    Refused unless `conn` is in a transaction and holds the segment's plan lock
    (`plan.plan_locks`): without them, a plan of the segment running at the same time could
    take a plan id before this one and commit after it."""
    segment_key = link["segment_key"]
    if not conn.is_in_transaction():
        raise SyncdError("a clear is queued inside the caller's transaction")
    if not await conn.fetchval(query("holds_segment_plan_lock"), segment_key):
        raise SyncdError(
            f"queueing a clear of {segment_key!r} needs its plan lock (plan.plan_locks)"
        )
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
