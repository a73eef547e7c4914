"""`syncd run`: the service that runs a sync ahead of every Criteo window, for months.

One Runtime (pool, Criteo client, token, pacing) for the process's whole life, and never
two runs at once in it: the service's own loop starts each run as a task it owns, one
after the other; APScheduler (syncd.daemon.schedule) only says that a slot is due.

Across replicas the database decides: a slot's run row is inserted with ON CONFLICT DO
NOTHING (sql/0008), so one replica runs it; the others watch it until its window, and
take it over if its run went away unfinished (crashed, interrupted). Chunks are claimed
with the leases and the liveness lock of every run (syncd.liveness), so a chunk is never
pushed by two runs at once. Chunks are claimed oldest plan first: with one window
schedule for every segment, the oldest chunks belong to the earliest, most urgent window.

Faults never end the process: a run that fails is logged and the next slot runs; a lost
database is waited for (`database_lost`, capped backoff, `database_back`) and the slot
run again if its window is still ahead. On SIGTERM/SIGINT the scheduler stops, the run
claims nothing more, requests in flight get SYNCD_SHUTDOWN_GRACE_S, what is left is
cancelled (its chunks are taken over by a later run once none of its requests can be in
flight), unstarted claims are handed back; a second signal cancels at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from syncd import ledger
from syncd.config import Settings
from syncd.daemon import metrics
from syncd.daemon.schedule import (
    Slot,
    SlotKind,
    build_scheduler,
    due_at_start,
    interval_slot,
    next_window,
    verified_window,
    window_slot,
)
from syncd.daemon.server import http_server
from syncd.db import query
from syncd.db.migrations import pending_migrations
from syncd.errors import ConfigError, DatabaseUnavailable
from syncd.logging import get_logger
from syncd.runtime import Runtime
from syncd.sync import RunSummary, run_slot
from syncd.verify import verify_window

log = get_logger(__name__)

Clock = Callable[[], dt.datetime]
Sleep = Callable[[float], Awaitable[None]]

# A slot another replica runs is looked at again this often until its window: it is taken
# over when that run went away unfinished.
SLOT_RECHECK_S = 30.0
# Backoff while the database is away: full jitter, doubling from 1 s up to a minute.
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
PROBE_TIMEOUT_S = 10.0
URGENCY: tuple[SlotKind, ...] = ("window", "interval")  # which due slot runs first


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Service:
    """The daemon's loop over one Runtime. `serve(stop, force)` until stop; then exit code."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        clock: Clock = utc_now,
        sleep: Sleep = asyncio.sleep,
        recheck_s: float = SLOT_RECHECK_S,
    ) -> None:
        self.runtime = runtime
        self.settings: Settings = runtime.settings
        self._clock = clock
        self._sleep = sleep
        self._recheck_s = recheck_s
        self._pending: dict[SlotKind, Slot] = {}
        self._watched: Slot | None = None  # lost to another replica; taken over if it fails
        self._watched_once: Slot | None = None  # the last slot said to be taken elsewhere
        self._wake = asyncio.Event()
        self._scheduler: Any = None
        self._looping = False
        self.database_ok = True

    def alive(self) -> bool:
        """The scheduler runs and the service loop turns (for /healthz)."""
        return bool(self._looping and self._scheduler is not None and self._scheduler.running)

    def seconds_to_next_window(self) -> float:
        now = self._clock()
        return (next_window(now, self.settings.windows_utc) - now).total_seconds()

    async def fire(self, kind: SlotKind) -> None:
        """The scheduler's job: say which slot is due, and return at once."""
        s, now = self.settings, self._clock()
        if kind == "window":
            self.request(window_slot(now, s.windows_utc))
        else:
            self.request(interval_slot(now, s.windows_utc, s.interval_minutes))

    async def verify(self) -> None:
        """The verification job: the window Criteo has had its hours to compute. Read-only
        towards Criteo, so it may overlap a run; a failure is logged, never raised."""
        s = self.settings
        window = verified_window(self._clock(), s.windows_utc, s.verify_after_hours)
        try:
            await verify_window(self.runtime, window)
        except Exception as exc:  # the database or Criteo away: the next window's verifies
            log.warning(
                "verification_failed", window=window.isoformat(), error_type=type(exc).__name__
            )

    def request(self, slot: Slot) -> None:
        self._pending[slot.kind] = slot
        self._wake.set()

    async def serve(self, stop: asyncio.Event, force: asyncio.Event | None = None) -> int:
        """Run slots as they come due until `stop`; 0 after a clean stop, 1 when `force`
        (a second signal) cut in-flight requests short."""
        force = force or asyncio.Event()
        s = self.settings
        self._scheduler = build_scheduler(
            s.windows_utc,
            s.lead_minutes,
            s.interval_minutes,
            self.fire,
            verify=self.verify,
            verify_after_hours=s.verify_after_hours,
        )
        self._scheduler.start()
        metrics.NEXT_WINDOW_SECONDS.set_function(self.seconds_to_next_window)
        await self._load_last_success()
        late = due_at_start(self._clock(), s.windows_utc, s.lead_minutes)
        if late is not None:
            self.request(late)  # started late or after downtime: the run is due now
        log.info(
            "daemon_started",
            windows_utc=[w.strftime("%H:%M") for w in s.windows_utc],
            lead_minutes=s.lead_minutes,
            interval_minutes=s.interval_minutes,
            next_window=next_window(self._clock(), s.windows_utc).isoformat(),
            late_start=late is not None,
        )
        self._looping = True
        try:
            async with contextlib.AsyncExitStack() as stack:
                if s.http_port:
                    await stack.enter_async_context(self._http())
                return await self._loop(stop, force)
        finally:
            self._looping = False
            self._scheduler.shutdown(wait=False)
            log.info("daemon_stopped", forced=force.is_set())

    async def _load_last_success(self) -> None:
        """Start syncd_last_success_timestamp_seconds from the database, not from 0 (a
        restart must not look like a deployment that never succeeded); best effort."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S), self.runtime.pool.acquire() as conn:
                last_success = await conn.fetchval(query("last_success"))
        except Exception:  # the database may be away: the first run's outcome sets it
            return
        if last_success is not None:
            metrics.LAST_SUCCESS.set(last_success)

    @contextlib.asynccontextmanager
    async def _http(self) -> AsyncIterator[None]:
        """/healthz, /readyz and /metrics for the process's life; a port that cannot be
        listened on is a setting to change (exit 2), said in one line."""
        s = self.settings
        try:
            async with http_server(
                self.runtime.pool, alive=self.alive, host=s.http_host, port=s.http_port
            ) as port:
                log.info("http_listening", host=s.http_host, port=port)
                yield
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError(
                f"SYNCD_HTTP_PORT: cannot listen on {s.http_host}:{s.http_port} ({reason}); "
                "choose another port, or 0 to turn the HTTP server off"
            ) from None

    async def _loop(self, stop: asyncio.Event, force: asyncio.Event) -> int:
        while not stop.is_set():
            slot = await self._next_slot(stop)
            if slot is None:
                continue
            if slot.window <= self._clock():
                log.warning("slot_skipped", slot=slot.key, reason="its window has passed")
                continue
            if not await self.run_once(slot, stop, force):
                return 1
        return 0

    async def _next_slot(self, stop: asyncio.Event) -> Slot | None:
        """The most urgent due slot (a window before an interval), or None on stop or when
        the watched slot is due for another look."""
        if not self._pending:
            self._wake.clear()
            timeout = self._recheck_s if self._watched is not None else None
            await _first_of(stop.wait(), self._wake.wait(), limit_s=timeout)
            if stop.is_set():
                return None
            if not self._pending and self._watched is not None:
                watched, self._watched = self._watched, None
                # Past its window, whoever ran it is accountable for it: stop watching.
                return watched if watched.window > self._clock() else None
        for kind in URGENCY:
            slot = self._pending.pop(kind, None)
            if slot is not None:
                return slot
        return None

    async def run_once(self, slot: Slot, stop: asyncio.Event, force: asyncio.Event) -> bool:
        """One run of a slot, watched for stop; False when a forced stop cut it short."""
        task = asyncio.create_task(
            run_slot(self.runtime, slot, trigger=slot.kind, sleep=self._sleep, stop=stop)
        )
        await _first_of(task, stop.wait())
        clean = True
        if not task.done():
            clean = await self._drain(task, force)
        try:
            summary = task.result()
        except asyncio.CancelledError:
            return clean
        except Exception as exc:  # never ends the process: logged, waited out, run again
            await self._after_failure(slot, exc, stop)
            return clean
        if summary is None:
            if self._watched_once != slot:  # once, not at every look while watching
                log.info("slot_taken_elsewhere", slot=slot.key)
            self._watched = self._watched_once = slot
        else:
            await self._account(slot, summary)
            await self._fold_ledger()
        return clean

    async def _fold_ledger(self) -> None:
        """After a run, with Criteo already holding what it sent: fold its acknowledged
        chunks into the ledger, so the next run starts with nothing to fold. A failure
        waits for the next run (which folds first) and never ends the process."""
        try:
            async with self.runtime.pool.acquire() as conn:
                await ledger.fold(conn)
        except Exception as exc:  # the database may be away: the next run folds
            log.warning("ledger_fold_deferred", error_type=type(exc).__name__)

    async def _drain(self, task: asyncio.Task[Any], force: asyncio.Event) -> bool:
        """Stopping with a run in flight: it claims nothing more (it saw `stop`); its
        requests in flight get the grace period, then it is cancelled. False if forced."""
        grace = self.settings.shutdown_grace_s
        log.info("shutdown_started", grace_s=grace)
        await _first_of(task, force.wait(), limit_s=grace)
        if task.done():
            return True
        log.warning("shutdown_cancelled_run", forced=force.is_set(), grace_s=grace)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return not force.is_set()

    async def _account(self, slot: Slot, summary: RunSummary) -> None:
        ok = summary.exit_code == 0
        metrics.RUNS.labels(outcome="ok" if ok else "failed").inc()
        if ok:
            metrics.LAST_SUCCESS.set(time.time())
        # Missed: ended after the window, or a window run ended before it with work left
        # (an interrupted one excepted: a restart or another replica may still make it).
        late = summary.made_window is False and (
            self._clock() > slot.window
            or (slot.kind == "window" and summary.status != "interrupted")
        )
        if not late:
            return
        metrics.WINDOWS_MISSED.inc()
        async with self.runtime.pool.acquire() as conn:
            left = [dict(r) for r in await conn.fetch(query("unacknowledged_by_segment"))]
        log.error(
            "window_missed",
            run_id=summary.run_id,
            slot=slot.key,
            window=slot.window.isoformat(),
            status=summary.status,
            chunks_left=summary.chunks_left,
            chunks_failed=summary.chunks_failed,
            segments=left,
        )

    async def _after_failure(self, slot: Slot, exc: Exception, stop: asyncio.Event) -> None:
        """A run raised. If the database is gone, wait for it and run the slot again;
        otherwise log it: the next slot runs as planned."""
        metrics.RUNS.labels(outcome="failed").inc()
        reason = await self.probe()
        if reason is None:
            log.error("run_crashed", slot=slot.key, error_type=type(exc).__name__)
            return
        if await self.wait_for_database(reason, stop) and slot.window > self._clock():
            self.request(slot)  # its run (now crashed) left work before a window still ahead

    async def probe(self) -> str | None:
        """None when the database answers and its schema is current, else why not."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S), self.runtime.pool.acquire() as conn:
                pending = await pending_migrations(conn)
        except Exception as exc:  # any failure to answer is the answer
            return type(exc).__name__
        return f"{len(pending)} migration(s) pending" if pending else None

    async def wait_for_database(self, reason: str, stop: asyncio.Event) -> bool:
        """Log `database_lost`, probe with capped backoff until it answers (True) or stop."""
        self.database_ok = False
        log.error("database_lost", reason=reason)
        lost, attempt = time.monotonic(), 0
        while not stop.is_set():
            attempt += 1
            delay = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 16)))
            await _first_of(self._sleep(delay), stop.wait())
            if stop.is_set():
                break
            if await self.probe() is None:
                self.database_ok = True
                log.info("database_back", down_s=round(time.monotonic() - lost, 1))
                return True
        return False


async def _first_of(*waits: Awaitable[Any], limit_s: float | None = None) -> None:
    """Wait until the first of `waits` finishes (or `limit_s` passes); the others are cancelled,
    except tasks, which belong to the caller."""
    futures = [asyncio.ensure_future(w) for w in waits]
    owned = [f for f, w in zip(futures, waits, strict=True) if f is not w]
    try:
        await asyncio.wait(futures, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in owned:
            future.cancel()
        await asyncio.gather(*owned, return_exceptions=True)


async def run_daemon(settings: Settings, stop: asyncio.Event, force: asyncio.Event) -> int:
    """`syncd run`: open the process's one Runtime (waiting for the database if it is not
    there yet) and serve until stopped."""
    attempt = 0
    while not stop.is_set():
        try:
            async with Runtime.open(settings) as runtime:
                return await Service(runtime).serve(stop, force)
        except DatabaseUnavailable as exc:
            attempt += 1
            log.error("database_lost", reason=str(exc), attempt=attempt)
            delay = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 16)))
            await _first_of(asyncio.sleep(delay), stop.wait())
    return 0
