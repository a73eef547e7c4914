"""One sync run, start to finish: plan and push concurrently, then record the totals.

A run takes a Runtime (the pool and the Criteo client the process keeps for its life).

The run holds a session advisory lock on a dedicated connection for its whole life and
proves it on a heartbeat (syncd.liveness): a run that loses it stops claiming and sending
at once and ends failed; another run takes over its claimed chunks only once none of its
requests can still be in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from syncd import ledger, plan, privacy
from syncd.config import Settings
from syncd.db import query
from syncd.db.migrations import check_schema
from syncd.errors import RunAbortingError
from syncd.liveness import RunLock, RunSlot
from syncd.logging import get_logger
from syncd.runtime import Runtime

if TYPE_CHECKING:
    from syncd.push import Pusher, Sleep

log = get_logger(__name__)

IDLE_POLL_S = 0.5  # how often an idle worker looks again while others still work


@dataclass
class RunSummary:
    run_id: int
    status: str
    changes_consumed: int = 0
    identifiers_rejected: int = 0
    identifiers_suppressed: int = 0  # net adds of suppressed identifiers, never sent
    chunks_planned: int = 0
    chunks_acknowledged: int = 0
    chunks_failed: int = 0
    chunks_left: int = 0
    plans_failed: int = 0
    plans_blocked: int = 0  # held back by the mass-removal guard
    requests: int = 0
    identifiers_sent: int = 0
    nb_valid: int = 0
    nb_invalid: int = 0
    error: str | None = None
    # Stopped by a refusal every request would meet (credentials, retired API version).
    aborted: bool = False
    made_window: bool | None = None
    segments: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    # Changes kept in the inbox because their segment key is not linked.
    waiting_unlinked: list[dict[str, Any]] = field(default_factory=list)
    # Each Criteo app's use of its call budget (shared by every process), and this run's.
    budgets: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.aborted:
            return 2  # the settings must change before any run can succeed
        if self.status == "failed":
            return 1
        work_left = (
            self.chunks_failed or self.chunks_left or self.plans_failed or self.plans_blocked
        )
        return 1 if work_left else 0


class SyncRun:
    """Plans and pushes until nothing this run can send is left."""

    def __init__(
        self,
        runtime: Runtime,
        run_id: int,
        sleep: Sleep = asyncio.sleep,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.pool = runtime.pool
        self.run_id = run_id
        # The run's own stop: set by the caller's `stop` (relayed while the run executes)
        # and by the loss of its liveness lock, which must not stop the caller's process.
        self.stop = asyncio.Event()
        self._caller_stop = stop
        self._sleep = sleep
        self.abort_error: RunAbortingError | None = None
        self.liveness_lost: str | None = None
        self._in_flight = 0
        self._progress = asyncio.Condition()
        self.plans: list[plan.SegmentPlan] = []
        self.plan_failures: list[plan.PlanFailure] = []
        self.planning_s: float | None = None  # how long planning took, once done

    async def execute(self, lock: RunLock | None = None) -> None:
        try:
            async with self._watching(lock), asyncio.TaskGroup() as group:
                group.create_task(self._plan())
                group.create_task(self._push())
        except ExceptionGroup as failed:
            # Report what went wrong (a lost database, a bug), not "unhandled errors in a
            # TaskGroup": the first error, however deeply the task groups nest it.
            raise _first_error(failed) from failed

    @contextlib.asynccontextmanager
    async def _watching(self, lock: RunLock | None) -> AsyncIterator[None]:
        """While the run executes: relay the caller's stop, and keep the liveness lock."""
        watchers = []
        if self._caller_stop is not None:
            watchers.append(asyncio.create_task(_relay(self._caller_stop, self.stop)))
        if lock is not None:
            watchers.append(asyncio.create_task(lock.keep(self.lose_liveness)))
        try:
            yield
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    def lose_liveness(self, reason: str) -> None:
        """The lock is gone: another run may soon take this run's chunks. Claim and send
        nothing more (requests in flight end within the HTTP timeout), then end."""
        self.liveness_lost = reason
        self.stop.set()
        log.error("run_liveness_lost", reason=reason)

    async def _plan(self) -> None:
        clock = time.monotonic()
        try:
            self.plans, self.plan_failures = await plan.plan_all(
                self.pool,
                self.run_id,
                self.settings.chunk_size,
                self.settings.plan_concurrency,
                on_planned=lambda planned: self._notify(planned.chunks),
                should_stop=self.stop.is_set,
                max_remove_fraction=self.settings.max_remove_fraction,
            )
        finally:
            self.planning_s = time.monotonic() - clock  # set: planning is done
            await self._notify(self.settings.concurrency)

    async def _push(self) -> None:
        client = await self.runtime.criteo()
        from syncd.push import Pusher  # after the client: aiohttp is imported by then

        pusher = Pusher(
            self.pool,
            client,
            self.settings,
            self.run_id,
            self._sleep,
            self.stop,
            clients=self.runtime.criteo,
        )
        async with asyncio.TaskGroup() as workers:
            for _ in range(self.settings.concurrency):
                workers.create_task(self._worker(pusher))
        released = await pusher.release()
        if released:
            log.info("chunks_released", chunks=released)

    async def _worker(self, pusher: Pusher) -> None:
        # A cool-down past SYNCD_RETRY_MAX_WAIT_S ends the run (exit 1): its chunks wait for
        # a later run rather than holding this one (and its claims) for the whole wait.
        while not self.stop.is_set() and not pusher.cooling_down():
            chunk = await pusher.claim()
            if chunk is None:
                if not await self._should_wait(pusher):
                    await self._notify(self.settings.concurrency)  # the others end too
                    return
                await self._wait_for_progress()
                continue
            # There may be more: wake one more idle worker to look (a cascade, rather
            # than every idle worker querying at every event).
            await self._notify(1)
            self._in_flight += 1
            try:
                await pusher.push(chunk)
            except RunAbortingError as exc:
                self.abort_error = exc
                self.stop.set()
            finally:
                self._in_flight -= 1
                await self._notify(1)  # it may have unblocked a later plan's chunk

    async def _should_wait(self, pusher: Pusher) -> bool:
        """Nothing claimable now: wait if more may come (planning, our pushes, an app's
        short cool-down, other runs)."""
        if self.planning_s is None or self._in_flight or pusher.waiting_for_cooldown():
            return True
        async with self.pool.acquire() as conn:
            return bool(await conn.fetchval(query("claimed_elsewhere"), self.run_id))

    async def _wait_for_progress(self) -> None:
        async with self._progress:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), IDLE_POLL_S)

    async def _notify(self, workers: int) -> None:
        """Wake up to `workers` idle workers (new chunks, a finished push, the end)."""
        async with self._progress:
            self._progress.notify(workers)


def _first_error(group: BaseExceptionGroup[Exception]) -> Exception:
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def sync_once(
    settings: Settings,
    *,
    trigger: str = "manual",
    sleep: Sleep = asyncio.sleep,
    stop: asyncio.Event | None = None,
) -> RunSummary:
    """Open a runtime, run one sync in it, close it: `syncd sync`."""
    async with Runtime.open(settings) as runtime:
        return await run_sync(runtime, trigger=trigger, sleep=sleep, stop=stop)


async def run_sync(
    runtime: Runtime,
    *,
    trigger: str = "manual",
    sleep: Sleep = asyncio.sleep,
    stop: asyncio.Event | None = None,
) -> RunSummary:
    """Run one sync now in a runtime the caller keeps, and return its summary."""
    summary = await run_slot(runtime, None, trigger=trigger, sleep=sleep, stop=stop)
    assert summary is not None  # only a slot can be taken
    return summary


async def run_slot(
    runtime: Runtime,
    slot: RunSlot | None,
    *,
    trigger: str = "manual",
    sleep: Sleep = asyncio.sleep,
    stop: asyncio.Event | None = None,
) -> RunSummary | None:
    """Run one sync for a daemon slot (or none); None when another run has the slot."""
    started = time.monotonic()
    settings = runtime.settings
    lock = await RunLock.open(settings)
    try:
        await check_schema(lock.conn)
        dead = await lock.conn.fetch(query("mark_dead_runs"))
        # What earlier runs acknowledged and nobody folded yet (the daemon folds after each
        # run; a one-shot `syncd sync` leaves its own to the next run or reader). On the
        # pool: the lock connection is the run's liveness, kept free for its heartbeat.
        async with runtime.pool.acquire() as conn:
            await ledger.fold(conn)
        row = await lock.start_run(trigger, slot)
        if row is None:
            return None
        run_id = row["id"]
        runtime.new_run()
        with structlog.contextvars.bound_contextvars(run_id=run_id):
            await _housekeeping(lock, settings, row, trigger, slot, len(dead))
            status, error = "succeeded", None
            run: SyncRun | None = None
            try:
                # The CRM's consent withdrawals first: each is a forget (removes queued,
                # suppressed) before this run plans any add for that person.
                async with runtime.pool.acquire() as conn:
                    await privacy.process_withdrawals(conn, settings.chunk_size, run_id)
                run = SyncRun(runtime, run_id, sleep, stop)
                await run.execute(lock)
            except asyncio.CancelledError:
                status, error = "interrupted", "cancelled"
                raise
            except Exception as exc:  # recorded on the run row, then reported by the CLI
                status, error = "failed", f"{type(exc).__name__}: {exc}"
                raise
            finally:
                status, error = _final_status(run, status, error)
                # The pool, not the lock connection: that one may be what was lost.
                async with runtime.pool.acquire() as conn:
                    await _record_api_notice(conn, runtime, run_id)
                    summary = await _finish(conn, run_id, status, error, run, started)
                summary.aborted = run is not None and run.abort_error is not None
            return summary
    finally:
        await lock.close()


async def _housekeeping(
    lock: RunLock, settings: Settings, row: Any, trigger: str, slot: RunSlot | None, dead: int
) -> None:
    """Before planning: failed chunks re-armed, old history pruned; the run_started line."""
    rearmed = await lock.conn.fetch(query("rearm_failed_chunks"))
    pruned = await lock.conn.fetchrow(query("prune_history"), settings.retention_days)
    log.info(
        "run_started",
        trigger=trigger,
        slot=None if slot is None else slot.key,
        target_window=row["target_window"].isoformat(),
        dead_runs_marked=dead,
        failed_chunks_rearmed=len(rearmed),
        plans_pruned=pruned["plans"],
        rejected_pruned=pruned["rejected"],
    )


def _final_status(run: SyncRun | None, status: str, error: str | None) -> tuple[str, str | None]:
    """What the run row records: an abort or a lost liveness fails it, a stop interrupts it."""
    if run is not None and run.abort_error is not None:
        return "failed", str(run.abort_error)
    if run is not None and run.liveness_lost is not None:
        return "failed", f"run liveness lost ({run.liveness_lost})"
    if run is not None and run.stop.is_set() and status == "succeeded":
        return "interrupted", error
    return status, error


async def _record_api_notice(conn: Any, runtime: Runtime, run_id: int) -> None:
    """What Criteo said of the API version during the run (deprecated, sunset), for
    `syncd status`; nothing when the run never talked to Criteo."""
    if not runtime.talked_to_criteo():
        return
    deprecated, sunset = runtime.api_notice()
    await conn.execute(
        query("record_api_notice"),
        run_id,
        runtime.settings.criteo_api_version,
        deprecated,
        None if sunset is None else dt.datetime.fromtimestamp(sunset, dt.UTC),
    )


async def _finish(
    conn: Any,
    run_id: int,
    status: str,
    error: str | None,
    run: SyncRun | None,
    started: float,
) -> RunSummary:
    """Total the run from its plans and audit rows, record it, log run_finished."""
    summary = await _tally(conn, RunSummary(run_id=run_id, status=status, error=error), run)
    if summary.status == "succeeded" and summary.exit_code:
        summary.status = "failed"
    summary.made_window = await conn.fetchval(
        query("finish_run"),
        run_id,
        summary.status,
        summary.changes_consumed,
        summary.identifiers_rejected,
        summary.chunks_planned,
        summary.chunks_acknowledged,
        summary.chunks_failed,
        summary.chunks_left,
        summary.requests,
        summary.identifiers_sent,
        summary.nb_valid,
        summary.nb_invalid,
        summary.error,
        summary.identifiers_suppressed,
    )
    _log_finished(summary, run, started)
    return summary


async def _tally(conn: Any, summary: RunSummary, run: SyncRun | None) -> RunSummary:
    """The run's totals: its plans (in memory) and what the database says was sent."""
    plans = run.plans if run else []
    summary.changes_consumed = sum(p.changes_consumed for p in plans)
    summary.identifiers_rejected = sum(p.rejected for p in plans)
    summary.identifiers_suppressed = sum(p.suppressed for p in plans)
    summary.chunks_planned = sum(p.chunks for p in plans)
    run_id = summary.run_id
    summary.segments = [dict(r) for r in await conn.fetch(query("run_segment_report"), run_id)]
    summary.rejected = [dict(r) for r in await conn.fetch(query("run_rejected_report"), run_id)]
    for seg in summary.segments:
        summary.chunks_acknowledged += seg["chunks_acknowledged"]
        summary.chunks_failed += seg["chunks_failed"]
        summary.identifiers_sent += seg["sent"]
        summary.nb_valid += seg["valid"]
        summary.nb_invalid += seg["invalid"]
    summary.requests = sum(s["requests"] or 0 for s in summary.segments)
    summary.chunks_left = await conn.fetchval(query("chunks_left"))
    summary.waiting_unlinked = [dict(r) for r in await conn.fetch(query("waiting_unlinked"))]
    summary.budgets = [dict(r) for r in await conn.fetch(query("run_budget_use"), run_id)]
    _plan_failures(summary, run.plan_failures if run else [])
    return summary


def _plan_failures(summary: RunSummary, failures: list[plan.PlanFailure]) -> None:
    """Plans that failed or were blocked fail the run (exit 1), said by segment."""
    blocked = sorted(f.segment_key for f in failures if f.blocked)
    failed = sorted(f.segment_key for f in failures if not f.blocked)
    summary.plans_failed = len(failed)
    summary.plans_blocked = len(blocked)
    said = []
    if failed:
        said.append(
            f"the plan of {len(failed)} segment(s) failed ({', '.join(failed)}); their changes "
            "stay in the inbox for the next run (see plan_failed in the log)"
        )
    if blocked:
        said.append(
            f"the plan of {len(blocked)} segment(s) was blocked by the mass-removal guard "
            f"({', '.join(blocked)}): nothing of it was sent (see segment_blocked in the log; "
            "`syncd approve KEY` if the removals are meant)"
        )
    if said and summary.error is None:
        summary.error = "; ".join(said)


def _log_finished(summary: RunSummary, run: SyncRun | None, started: float) -> None:
    """The run's one canonical line: every total, its duration and its error."""
    log.info(
        "run_finished",
        status=summary.status,
        changes=summary.changes_consumed,
        rejected=summary.identifiers_rejected,
        suppressed=summary.identifiers_suppressed,
        chunks_planned=summary.chunks_planned,
        chunks_acknowledged=summary.chunks_acknowledged,
        chunks_failed=summary.chunks_failed,
        chunks_left=summary.chunks_left,
        plans_failed=summary.plans_failed,
        plans_blocked=summary.plans_blocked,
        identifiers_sent=summary.identifiers_sent,
        nb_valid=summary.nb_valid,
        nb_invalid=summary.nb_invalid,
        made_window=summary.made_window,
        changes_waiting_unlinked=sum(r["changes"] for r in summary.waiting_unlinked),
        duration_s=round(time.monotonic() - started, 3),
        planning_s=None if run is None or run.planning_s is None else round(run.planning_s, 3),
        error=summary.error,
    )
