"""Push: claim a chunk, send it with retries, finalise it with its audit row.

Claims are short transactions (SKIP LOCKED + lease). The lease is renewed right before
every sending, so no request leaves with a lease that ran out while it waited (for a
token, a cool-down, a 401's re-send). A request body is streamed from the chunk's stored
payload in slices while it is uploaded (a pooled connection per slice, no transaction,
never held between slices), so memory does not depend on chunk sizes. The finalise is
one statement fenced by the lease, so a run that lost its chunk to another run writes
nothing but a `lease_lost` audit row. An unexpected error finishes its chunk, never the
run's other requests.
"""

from __future__ import annotations

import asyncio
import json
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from syncd.config import Settings
from syncd.criteo import AmendmentBody, AmendmentResult, CriteoClient, Target, amendment_body
from syncd.criteo.audiences import send_chunk
from syncd.criteo.pacing import retry_wait_s
from syncd.daemon import metrics
from syncd.db import query
from syncd.errors import (
    CriteoError,
    PayloadTooLarge,
    PermanentError,
    RetryableError,
    RunAbortingError,
)
from syncd.logging import get_logger

log = get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]
# The client of a Criteo app by name (Runtime.criteo).
ClientSource = Callable[[str], Awaitable[CriteoClient]]

ChunkState = Literal["pending", "claimed", "done", "failed"]
PushOutcome = Literal["acknowledged", "failed", "deferred", "split", "released", "lease_lost"]
# The chunk's state after each outcome _finish records (split and lease_lost have their
# own statements).
_STATE_AFTER: dict[PushOutcome, ChunkState] = {
    "acknowledged": "done",
    "failed": "failed",
    "deferred": "pending",  # due again after its delay
    "released": "pending",  # at once, for whichever run comes next
}

# A request body is read from the database this many bytes at a time (about 3,900
# hashed identifiers): what one request in flight holds in memory.
PAYLOAD_SLICE_BYTES = 256 * 1024


@dataclass(frozen=True)
class Chunk:
    id: int
    plan_id: int
    segment_key: str
    operation: str
    identifier_count: int
    target: Target
    # The size of the stored payload (a UTF-8 JSON array), streamed when sent.
    payload_bytes: int
    app: str = "default"  # the Criteo app whose credentials and budget send it

    @classmethod
    def from_row(cls, row: Any) -> Chunk:
        target = Target(
            api=row["api"],
            segment_id=row["criteo_segment_id"],
            identifier_type=row["identifier_type"],
            account_id=row["account_id"],
            gum_caller_id=row["gum_caller_id"],
        )
        return cls(
            id=row["id"],
            plan_id=row["plan_id"],
            segment_key=row["segment_key"],
            operation=row["operation"],
            identifier_count=row["identifier_count"],
            target=target,
            payload_bytes=row["payload_bytes"],
            app=row["app"],
        )


class _LeaseGone(Exception):
    """Right before a sending: this run no longer owns the chunk, so nothing is sent."""


@dataclass
class _Progress:
    """One push of one chunk so far: what its audit row will say."""

    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    clock: float = field(default_factory=time.monotonic)
    attempts: int = 0  # sendings, 429s included: what the audit row counts
    faults: int = 0  # real faults only (5xx, timeouts, dropped connections): the cap's count
    last_error: CriteoError | None = None


class Pusher:
    """Pushes claimed chunks for one run."""

    def __init__(
        self,
        pool: Any,
        client: CriteoClient,
        settings: Settings,
        run_id: int,
        sleep: Sleep = asyncio.sleep,
        stop: asyncio.Event | None = None,
        clients: ClientSource | None = None,
    ) -> None:
        self._pool = pool
        # One client per Criteo app (Runtime.criteo), opened when a chunk needs it.
        self._clients: dict[str, CriteoClient] = {client.app: client}
        self._source = clients
        self._in_flight: Counter[str] = Counter()
        self._claiming = asyncio.Lock()
        self._settings = settings
        self._run_id = run_id
        self._sleep = sleep
        self._stop = stop or asyncio.Event()

    async def claim(self) -> Chunk | None:
        """The next chunk to send, of an app that can send now: an app cooling down after
        a 429, or holding every slot but one per other app, is passed over, so one app's
        429s or outage never hold up another's chunks."""
        # One claim at a time, so each app's count of chunks in hand is exact when the
        # next claim decides which apps may have one more (a claim is one short statement).
        async with self._claiming:
            apps = self._apps_ready()
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(
                    query("claim_chunk"), self._run_id, self._settings.lease_s, apps
                )
            if row is None:
                return None
            chunk = Chunk.from_row(row)
            self._in_flight[chunk.app] += 1
            return chunk

    def _apps_ready(self) -> list[str]:
        """The configured apps that may send now: every app leaves one slot to each other
        app, and an app cooling down waits without holding any."""
        apps = self._settings.app_names
        cap = max(1, self._settings.concurrency - (len(apps) - 1))
        return [
            app
            for app in apps
            if self._in_flight[app] < cap
            and not (app in self._clients and self._clients[app].cooldown.remaining_s() > 0)
        ]

    def cooling_down(self) -> bool:
        """Criteo asked every sender of every app to wait longer than
        SYNCD_RETRY_MAX_WAIT_S: nothing can be sent before then, so claiming more only to
        hand it back is pointless."""
        limit = self._settings.retry_max_wait_s
        return all(
            app in self._clients and self._clients[app].cooldown.remaining_s() > limit
            for app in self._settings.app_names
        )

    def waiting_for_cooldown(self) -> bool:
        """An app's chunks are passed over until a short cool-down ends: worth waiting."""
        limit = self._settings.retry_max_wait_s
        return any(0 < c.cooldown.remaining_s() <= limit for c in self._clients.values())

    async def _client(self, app: str) -> CriteoClient:
        client = self._clients.get(app)
        if client is None:
            if self._source is None:
                raise RunAbortingError(f"no Criteo client for app {app!r}", code="unknown-app")
            client = self._clients[app] = await self._source(app)
        return client

    async def push(self, chunk: Chunk) -> PushOutcome:
        """Send one chunk until acknowledged, failed, deferred or split; return the outcome.

        An unexpected error (a bug, an answer nothing foresaw) fails this chunk with the
        reason and leaves the run's other requests alone; a refusal every request would
        meet (RunAbortingError) still stops the run.
        """
        progress = _Progress()
        try:
            return await self._push(chunk, progress, await self._client(chunk.app))
        except RunAbortingError:
            raise
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            # The type and the place only: a message may quote an answer or a value.
            log.error(
                "chunk_push_crashed",
                chunk_id=chunk.id,
                segment_key=chunk.segment_key,
                error_type=type(exc).__name__,
                where=f"{where.filename}:{where.lineno}",
            )
            error = CriteoError(f"unexpected error: {type(exc).__name__}", code="unexpected")
            return await self._finish(chunk, "failed", progress, error=error)
        finally:
            self._in_flight[chunk.app] -= 1

    async def _push(self, chunk: Chunk, p: _Progress, client: CriteoClient) -> PushOutcome:
        body = self._body(chunk)
        wait_s = 0.0
        while True:
            turn, delay_s = await self._await_turn(client, wait_s)
            if turn == "stop":
                # Stopping: a chunk waiting for its next attempt goes back untouched.
                return await self._finish(chunk, "released", p, error=p.last_error)
            if turn == "defer":
                # Too long to hold a claim and a sender: back with a due time instead.
                error = p.last_error or RetryableError(
                    f"Criteo asked every sender to wait {delay_s:.0f} s", code="cooldown"
                )
                return await self._finish(chunk, "deferred", p, error=error, delay_s=delay_s)
            p.attempts += 1
            try:
                result = await send_chunk(  # a clear, or an add/remove with its body
                    client,
                    chunk.target,
                    chunk.operation,
                    body,
                    f"syncd-chunk-{chunk.id}",
                    before_send=lambda: self._before_send(chunk),
                )
            except _LeaseGone:
                return await self._lease_lost(chunk, p, None)
            except RetryableError as exc:
                p.last_error = exc
                next_wait = self._after_retryable(client, chunk, exc, p)
                if next_wait is None:
                    return await self._finish(chunk, "failed", p, error=exc)
                wait_s = next_wait
                continue
            except RunAbortingError as exc:
                # Not this chunk's fault: stop the run (so no worker claims the chunk
                # again), hand the chunk back untouched, and say why.
                self._stop.set()
                await self._finish(chunk, "released", p, error=exc)
                raise
            except PayloadTooLarge as exc:
                if chunk.identifier_count > 1:
                    return await self._split(chunk, p, exc)
                return await self._finish(chunk, "failed", p, error=exc)
            except PermanentError as exc:
                return await self._finish(chunk, "failed", p, error=exc)
            return await self._answered(chunk, p, result)

    async def _answered(self, chunk: Chunk, p: _Progress, result: AmendmentResult) -> PushOutcome:
        if result.refused:
            # A 2xx with errors and no counts: Criteo's code kept, the payload too.
            error = PermanentError(
                f"HTTP {result.http_status} with errors and no counts"
                f"{': ' + result.error_code if result.error_code else ''}",
                status=result.http_status,
                code=result.error_code or "errors-without-counts",
            )
            return await self._finish(chunk, "failed", p, result, error)
        outcome = await self._finish(chunk, "acknowledged", p, result)
        if outcome == "acknowledged":
            metrics.count_acknowledged(
                chunk.segment_key,
                chunk.operation,
                chunk.identifier_count,
                result.nb_valid,
                result.nb_invalid,
            )
        log.info(
            "chunk_pushed",
            chunk_id=chunk.id,
            segment_key=chunk.segment_key,
            operation=chunk.operation,
            identifiers=chunk.identifier_count,
            nb_valid=result.nb_valid,
            nb_invalid=result.nb_invalid,
            attempts=p.attempts,
            outcome=outcome,
            duration_ms=round((time.monotonic() - p.clock) * 1000),
        )
        return outcome

    async def _await_turn(
        self, client: CriteoClient, wait_s: float
    ) -> tuple[Literal["send", "defer", "stop"], float]:
        """Wait for the next sending: this chunk's own back-off and the shared cool-down
        (again if another 429 extended it meanwhile), then the pacer (and the cool-down
        again if a 429 came while it waited). A wait longer than SYNCD_RETRY_MAX_WAIT_S is
        not waited: ("defer", its length)."""
        cooldown = client.cooldown
        while True:
            until = cooldown.until
            wait = max(wait_s, cooldown.remaining_s())
            if wait > self._settings.retry_max_wait_s:
                return "defer", wait
            if not await self._pause(wait):
                return "stop", 0.0
            if cooldown.until > until:
                wait_s = 0.0
                continue
            until = cooldown.until
            if not await self._pause(await client.pacer.acquire()):
                return "stop", 0.0
            if cooldown.until <= until:
                return "send", 0.0
            wait_s = 0.0

    async def _before_send(self, chunk: Chunk) -> None:
        """Run right before each sending, a 401's re-send included: a token fetch queued
        behind others can outlast the lease, the sending must not."""
        if not await self._renew_lease(chunk):
            raise _LeaseGone

    def _body(self, chunk: Chunk) -> AmendmentBody:
        """The chunk's request body, its identifiers read slice by slice as it is sent."""

        async def identifiers() -> AsyncIterator[bytes]:
            for start in range(1, chunk.payload_bytes + 1, PAYLOAD_SLICE_BYTES):
                # A connection per slice, given back before the slice is handed on: a
                # body left suspended by a failed upload holds none (the pool could
                # not close).
                async with self._pool.acquire() as conn:
                    piece = await conn.fetchval(
                        query("payload_slice"), chunk.id, start, PAYLOAD_SLICE_BYTES, self._run_id
                    )
                if not piece:
                    return  # no longer ours: the body sees it short and aborts
                yield piece

        return amendment_body(chunk.target, chunk.operation, chunk.payload_bytes, identifiers)

    def _after_retryable(
        self, client: CriteoClient, chunk: Chunk, error: RetryableError, p: _Progress
    ) -> float | None:
        """The wait before the next attempt, or None when the attempts are used up. A 429
        makes every sender wait as long (the shared cool-down) and is no fault: the API
        says "later", so it never counts towards SYNCD_MAX_ATTEMPTS (a wait past
        SYNCD_RETRY_MAX_WAIT_S defers the chunk instead)."""
        s = self._settings
        attempts = p.attempts
        wait_s = retry_wait_s(attempts, error.retry_after_s, s.retry_base_s, s.retry_max_wait_s)
        if error.status == 429:
            client.cooldown.trip(wait_s)
        else:
            p.faults += 1
            if p.faults >= s.max_attempts:
                return None
        if wait_s <= s.retry_max_wait_s:  # longer: deferred (logged as not acknowledged)
            if error.status != 429:  # a 429 is counted as rate limited, not as a fault
                metrics.count_retry(chunk.app, error)
            log.info(
                "chunk_retry",
                chunk_id=chunk.id,
                segment_key=chunk.segment_key,
                attempt=attempts,
                status=error.status,
                error_code=error.code,
                delay_s=round(wait_s, 3),
            )
        return wait_s

    async def _pause(self, delay_s: float) -> bool:
        """Wait, unless the run is told to stop first; False when stopping."""
        if delay_s > 0 and not self._stop.is_set():
            sleeper = asyncio.ensure_future(self._sleep(delay_s))
            stopper = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Cancelled or not, neither task outlives the pause.
                sleeper.cancel()
                stopper.cancel()
                await asyncio.gather(sleeper, stopper, return_exceptions=True)
        return not self._stop.is_set()

    async def release(self) -> int:
        """Hand back every chunk this run claimed and did not finish (clean stop)."""
        async with self._pool.acquire() as conn:
            return len(await conn.fetch(query("release_run_claims"), self._run_id))

    async def _renew_lease(self, chunk: Chunk) -> bool:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                query("extend_lease"), chunk.id, self._run_id, self._settings.lease_s
            )
        return row is not None

    async def _finish(
        self,
        chunk: Chunk,
        outcome: PushOutcome,
        p: _Progress,
        result: AmendmentResult | None = None,
        error: CriteoError | None = None,
        delay_s: float = 0.0,
    ) -> PushOutcome:
        detail = str(error) if error else None
        code = error.code if error else None
        async with self._pool.acquire() as conn:
            audit_id = await conn.fetchval(
                query("finish_chunk"),
                chunk.id,
                self._run_id,
                _STATE_AFTER[outcome],
                delay_s,
                result.nb_valid if result else None,
                result.nb_invalid if result else None,
                json.dumps(result.sample_invalid) if result else None,
                result.http_status if result else (error.status if error else None),
                p.attempts,
                detail,
                outcome,
                code,
                json.dumps(result.warnings) if result and result.warnings else None,
                json.dumps(result.errors) if result and result.errors else None,
                result.contact_list_id if result else None,
                result.request_date if result else None,
                p.started,
            )
        if audit_id is None:
            return await self._lease_lost(chunk, p, result)
        metrics.CHUNKS_PUSHED.labels(chunk.app, outcome).inc()
        if outcome != "acknowledged":
            log.warning(
                "chunk_not_acknowledged",
                chunk_id=chunk.id,
                segment_key=chunk.segment_key,
                operation=chunk.operation,
                identifiers=chunk.identifier_count,
                outcome=outcome,
                status=error.status if error else None,
                error_code=code,
                error=detail,
                attempts=p.attempts,
                retry_in_s=round(delay_s, 1) if delay_s else None,
            )
        return outcome

    async def _split(self, chunk: Chunk, p: _Progress, error: PayloadTooLarge) -> PushOutcome:
        async with self._pool.acquire() as conn:
            audit_id = await conn.fetchval(
                query("split_chunk"),
                chunk.id,
                self._run_id,
                error.status,
                p.attempts,
                error.code,
                str(error),
                p.started,
            )
        if audit_id is None:
            return await self._lease_lost(chunk, p, None)
        metrics.CHUNKS_PUSHED.labels(chunk.app, "split").inc()
        log.warning(
            "chunk_split", chunk_id=chunk.id, segment_key=chunk.segment_key, status=error.status
        )
        return "split"

    async def _lease_lost(
        self, chunk: Chunk, p: _Progress, result: AmendmentResult | None
    ) -> PushOutcome:
        async with self._pool.acquire() as conn:
            await conn.execute(
                query("audit_lease_lost"),
                chunk.id,
                self._run_id,
                result.http_status if result else None,
                p.attempts,
                p.started,
            )
        metrics.CHUNKS_PUSHED.labels(chunk.app, "lease_lost").inc()
        log.warning("chunk_lease_lost", chunk_id=chunk.id, segment_key=chunk.segment_key)
        return "lease_lost"
