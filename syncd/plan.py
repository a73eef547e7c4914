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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from syncd import guard, mirror
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
    mirror: bool = False  # diffed from a mirror source (changes_consumed: its differences)
    # The mass-removal guard's counts (None: it had nothing to assess) and verdict.
    assessment: guard.Assessment | None = None

    @property
    def block(self) -> guard.Assessment | None:
        """The guard's assessment when it blocks this plan; None when the plan may go."""
        held = self.assessment
        return held if held is not None and held.blocked else None


@dataclass(frozen=True)
class PlanFailure:
    """A segment whose plan failed, or that the guard blocked (rolled back: a change log's
    changes stay in the inbox for the next run)."""

    segment_key: str
    error: str
    blocked: bool = False


class _Blocked(Exception):
    """Raised inside a plan's transaction to roll it back: the guard blocked it."""

    def __init__(self, plan: SegmentPlan, held: guard.Assessment) -> None:
        super().__init__(plan.segment_key)
        self.plan = plan
        self.held = held


async def plan_segment(
    conn: Any, run_id: int, segment_key: str, chunk_size: int, max_remove_fraction: float = 1.0
) -> SegmentPlan | None:
    """Plan one segment in a transaction of its own and commit it: its changes leave the
    inbox and its chunks are in the outbox, or nothing happened. None when the key is
    no longer linked (its changes wait for a link). A plan the guard blocks is rolled
    back, recorded on the link, and returned (`blocked`)."""
    async with plan_locks(conn, segment_key):
        attempt = 1
        while True:
            try:
                return await _plan_and_commit(
                    conn, run_id, segment_key, chunk_size, max_remove_fraction
                )
            except _Blocked as blocked:
                held = blocked.held
                await conn.execute(query("mark_blocked"), segment_key, held.removals, held.members)
                return blocked.plan
            except asyncpg.SerializationError:
                if attempt == PLAN_ATTEMPTS:
                    raise
                log.warning("plan_retried", segment_key=segment_key, attempt=attempt)
                attempt += 1


@asynccontextmanager
async def plan_locks(conn: Any, *segment_keys: str) -> AsyncIterator[None]:
    """Each segment's plan lock on `conn` for the block, in key order (two holders of
    several never deadlock). Everything that writes plans of a segment (a plan, a forget's
    removes, a resync) takes it, so plan ids order the segment's changes. A session lock,
    taken before the transaction opens: the transaction's snapshot then sees what the
    segment's previous plan consumed (a transaction-scoped lock would be taken after the
    snapshot in REPEATABLE READ)."""
    held: list[str] = []
    try:
        for key in sorted(segment_keys):
            await conn.execute(query("lock_segment_plan"), key)
            held.append(key)
        yield
    finally:
        for key in reversed(held):
            await conn.execute(query("unlock_segment_plan"), key)


async def _plan_and_commit(
    conn: Any, run_id: int, segment_key: str, chunk_size: int, max_remove_fraction: float
) -> SegmentPlan | None:
    async with conn.transaction(isolation="repeatable_read"):
        # The link is read here, not when the run listed the segments, and stays locked
        # until the commit: an unlink or re-link waits for this plan and then sees its
        # chunks. One changed since this transaction's snapshot is a serialization
        # failure: planned again, by the caller.
        link = await conn.fetchrow(query("lock_link_for_plan"), segment_key)
        if link is None:
            return None
        approved = link["removals_approved"]
        plan = await _plan(conn, run_id, link, chunk_size, 1.0 if approved else max_remove_fraction)
        if plan.block is not None:
            raise _Blocked(plan, plan.block)  # rolls the whole plan back
        if not plan.mirror:
            status = await conn.execute(query("consume_segment"), segment_key)
            deleted = int(status.split()[-1])  # "DELETE <rows>"
            if deleted != plan.changes_consumed:
                # Cannot happen under REPEATABLE READ; never commit it if it does.
                raise SyncdError(
                    f"plan of {segment_key!r} read {plan.changes_consumed} changes "
                    f"but would consume {deleted}; rolled back"
                )
        await conn.execute(query("clear_block"), segment_key)
        return plan


async def _plan(
    conn: Any, run_id: int, link: Any, chunk_size: int, max_remove_fraction: float
) -> SegmentPlan:
    """Write one segment's plan row, chunks and rejections in the caller's transaction;
    every chunk records the link's target. Mirror links diff their source (mirror.py),
    change-log links net their inbox changes; the guard assesses either."""
    segment_key = link["segment_key"]
    await conn.execute(query("plan_work_mem"))
    plan_id = await conn.fetchval(query("create_plan"), run_id, segment_key)
    if link["mirror_relation"] is not None:
        found = await mirror.diff(conn, run_id, plan_id, link, chunk_size)
        verdict = guard.Assessment(
            found.members,
            found.removes,
            guard.over_limit(found.removes, found.members, max_remove_fraction),
        )
        # A mirror's changes are the differences it found, not the rows it read: a sync
        # with nothing changed says 0, as a change log with nothing waiting does.
        plan = SegmentPlan(
            segment_key, plan_id, found.adds + found.removes, found.rejected, found.adds,
            found.removes, found.chunks, found.suppressed, mirror=True, assessment=verdict,
        )  # fmt: skip
    else:
        plan = await _plan_change_log(conn, run_id, link, plan_id, chunk_size)
        assessed = await guard.assess_change_log(
            conn, link, plan_id, plan.removes, max_remove_fraction
        )
        plan = replace(plan, assessment=assessed)
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


async def _plan_change_log(
    conn: Any, run_id: int, link: Any, plan_id: int, chunk_size: int
) -> SegmentPlan:
    segment_key = link["segment_key"]
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
    return SegmentPlan(
        segment_key=segment_key,
        plan_id=plan_id,
        changes_consumed=row["changes_consumed"],
        rejected=row["rejected"],
        adds=row["adds"],
        removes=row["removes"],
        chunks=row["chunks"],
        suppressed=row["suppressed"],
    )


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
    max_remove_fraction: float = 1.0,
) -> tuple[list[SegmentPlan], list[PlanFailure]]:
    """Plan every mirror link and every change-log link that has visible changes,
    `parallel` at a time. A plan that fails (a statement timeout on a huge backlog, a
    mirror source dropped) or that the guard blocks is logged and left for the next run;
    the other segments are planned and pushed all the same."""
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
                    plan = await plan_segment(
                        conn, run_id, segment_key, chunk_size, max_remove_fraction
                    )
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
            if plan.block is not None:
                failures.append(_blocked(plan.segment_key, plan.block, max_remove_fraction))
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


def _blocked(segment_key: str, held: guard.Assessment, max_remove_fraction: float) -> PlanFailure:
    log.error(
        "segment_blocked",
        segment_key=segment_key,
        removes=held.removals,
        members=held.members,
        max_remove_fraction=max_remove_fraction,
    )
    message = guard.block_message(segment_key, held.removals, held.members, max_remove_fraction)
    return PlanFailure(segment_key, message, blocked=True)


async def preview(
    conn: Any, chunk_size: int, max_remove_fraction: float = 1.0
) -> list[SegmentPlan]:
    """What a sync would send now: the real plan, in a transaction that is rolled back
    (nothing is consumed, so it takes no lock and never waits for a running sync), with
    the guard's verdict on each."""
    plans = []
    tx = conn.transaction(isolation="repeatable_read")
    await tx.start()
    try:
        # A run row of its own id, not the sequence's: a preview uses up no run id.
        run = await conn.fetchrow(query("start_preview_run"), socket.gethostname(), os.getpid())
        for link in await conn.fetch(query("segments_to_plan")):
            fraction = 1.0 if link["removals_approved"] else max_remove_fraction
            plans.append(await _plan(conn, run["id"], link, chunk_size, fraction))
    finally:
        await tx.rollback()
    return plans
