"""Plan: turn the inbox's visible changes into netted chunks, one segment per transaction.

All of the set work (normalising, validating, hashing, netting, chunking) is one
SQL statement (`plan_segment` in db/queries/plan.sql); a plain DELETE in the same REPEATABLE
READ transaction then consumes exactly the rows it read. Segments are planned one
transaction each, a few at a time, so pushing starts as soon as the first is planned.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from syncd.db import query
from syncd.errors import SyncdError
from syncd.logging import get_logger

log = get_logger(__name__)

# A plan meets a serialization failure only when something other than syncd deleted or
# updated inbox rows it read (the CRM only inserts); it then simply plans again.
PLAN_ATTEMPTS = 3


@dataclass(frozen=True)
class SegmentPlan:
    segment_key: str
    plan_id: int
    changes_consumed: int
    rejected: int
    adds: int
    removes: int
    chunks: int
    # Net adds not sent: the identifier is suppressed (syncd.suppressions).
    suppressed: int = 0


@dataclass(frozen=True)
class PlanFailure:
    """A segment whose plan failed: its changes stay in the inbox for the next run."""

    segment_key: str
    error: str


async def plan_segment(
    conn: Any, run_id: int, segment_key: str, chunk_size: int
) -> SegmentPlan | None:
    """Plan one segment in a transaction of its own and commit it: its changes leave the
    inbox and its chunks are in the outbox, or nothing happened. None when the key is
    no longer linked (its changes wait for a link)."""
    # Serialise plans of one segment (plan ids then order its changes), before the
    # transaction starts, so its snapshot sees what the previous plan consumed.
    await conn.execute(query("lock_segment_plan"), segment_key)
    try:
        attempt = 1
        while True:
            try:
                async with conn.transaction(isolation="repeatable_read"):
                    # The link is read here, not when the run listed the segments, and
                    # stays locked until the commit: an unlink or re-link waits for this
                    # plan and then sees its chunks. One changed since this transaction's
                    # snapshot is a serialization failure: planned again, below.
                    link = await conn.fetchrow(query("lock_link_for_plan"), segment_key)
                    if link is None:
                        return None
                    plan = await _plan(conn, run_id, link, chunk_size)
                    status = await conn.execute(query("consume_segment"), segment_key)
                    deleted = int(status.split()[-1])  # "DELETE <rows>"
                    if deleted != plan.changes_consumed:
                        # Cannot happen under REPEATABLE READ; never commit it if it does.
                        raise SyncdError(
                            f"plan of {segment_key!r} read {plan.changes_consumed} changes "
                            f"but would consume {deleted}; rolled back"
                        )
                    return plan
            except asyncpg.SerializationError:
                if attempt == PLAN_ATTEMPTS:
                    raise
                log.warning("plan_retried", segment_key=segment_key, attempt=attempt)
                attempt += 1
    finally:
        await conn.execute(query("unlock_segment_plan"), segment_key)


async def _plan(conn: Any, run_id: int, link: Any, chunk_size: int) -> SegmentPlan:
    """Write one segment's plan row, chunks and rejections in the caller's transaction;
    every chunk records the link's target."""
    segment_key = link["segment_key"]
    await conn.execute(query("plan_work_mem"))
    plan_id = await conn.fetchval(query("create_plan"), run_id, segment_key)
    row = await conn.fetchrow(
        query("plan_segment"),
        plan_id,
        segment_key,
        link["identifier_type"],
        link["send_as"],
        run_id,
        chunk_size,
        link["api"],
        link["criteo_segment_id"],
        link["account_id"],
        link["gum_caller_id"],
        link["app"],
    )
    plan = SegmentPlan(
        segment_key=segment_key,
        plan_id=plan_id,
        changes_consumed=row["changes_consumed"],
        rejected=row["rejected"],
        adds=row["adds"],
        removes=row["removes"],
        chunks=row["chunks"],
        suppressed=row["suppressed"],
    )
    await conn.execute(
        query("record_plan"),
        plan_id,
        plan.changes_consumed,
        plan.rejected,
        plan.adds,
        plan.removes,
        plan.chunks,
        plan.suppressed,
    )
    return plan


def _segment_failure(exc: BaseException) -> str | None:
    """What to log when `exc` failed one segment's plan; None when it ends the whole run
    (the database went away, or a bug). Never str(exc): a PostgreSQL error's DETAIL can
    quote a row, identifiers included."""
    if isinstance(exc, SyncdError):
        return str(exc)
    if not isinstance(exc, asyncpg.PostgresError) or isinstance(exc, _RUN_ENDING):
        return None
    return f"{type(exc).__name__}: {exc.args[0] if exc.args else ''}"


# The server or the connection is gone: no other plan or push would fare better.
_RUN_ENDING = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
)


async def plan_all(
    pool: Any,
    run_id: int,
    chunk_size: int,
    parallel: int,
    on_planned: Callable[[SegmentPlan], Awaitable[None]],
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[list[SegmentPlan], list[PlanFailure]]:
    """Plan every linked segment that has visible changes, `parallel` at a time. A plan
    that fails (a statement timeout on a huge backlog, say) is logged and left for the
    next run; the other segments are planned and pushed all the same."""
    async with pool.acquire() as conn:
        segments = await conn.fetch(query("segments_to_plan"))
    gate = asyncio.Semaphore(parallel)
    plans: list[SegmentPlan] = []
    failures: list[PlanFailure] = []

    async def one(segment_key: str) -> None:
        async with gate:
            if should_stop():
                return
            try:
                async with pool.acquire() as conn:
                    plan = await plan_segment(conn, run_id, segment_key, chunk_size)
            except Exception as exc:
                error = _segment_failure(exc)
                if error is None:
                    raise
                failures.append(PlanFailure(segment_key, error))
                sqlstate = getattr(exc, "sqlstate", None)
                log.error("plan_failed", segment_key=segment_key, sqlstate=sqlstate, error=error)
                return
            if plan is None:
                log.warning("plan_skipped", segment_key=segment_key, reason="no longer linked")
                return
            plans.append(plan)
            log.info(
                "segment_planned",
                segment_key=plan.segment_key,
                plan_id=plan.plan_id,
                changes=plan.changes_consumed,
                adds=plan.adds,
                removes=plan.removes,
                rejected=plan.rejected,
                suppressed=plan.suppressed,
                chunks=plan.chunks,
            )
            await on_planned(plan)

    async with asyncio.TaskGroup() as group:
        for segment in segments:
            group.create_task(one(segment["segment_key"]))
    return plans, failures


async def preview(conn: Any, chunk_size: int) -> list[SegmentPlan]:
    """What a sync would send now: the real plan, in a transaction that is rolled back
    (nothing is consumed, so it takes no lock and never waits for a running sync)."""
    plans = []
    tx = conn.transaction(isolation="repeatable_read")
    await tx.start()
    try:
        # A run row of its own id, not the sequence's: a preview uses up no run id.
        run = await conn.fetchrow(query("start_preview_run"), socket.gethostname(), os.getpid())
        for link in await conn.fetch(query("segments_to_plan")):
            plans.append(await _plan(conn, run["id"], link, chunk_size))
    finally:
        await tx.rollback()
    return plans
