"""Push: claim a chunk, send it with retries, finalise it with its audit row.

Claims are short transactions (SKIP LOCKED + lease). A request body is streamed from
the chunk's stored payload in slices while it is uploaded (one connection, no
transaction, held for the upload only, not while Criteo answers), so memory does not
depend on chunk sizes. The finalise is one statement fenced by the lease, so a run that
lost its chunk to another run writes nothing but a `lease_lost` audit row.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from syncd.config import Settings
from syncd.criteo import AmendmentBody, AmendmentResult, CriteoClient, Target, amend, amendment_body
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
        )


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Capped exponential backoff with full jitter: uniform(0, min(cap, base * 2^(n-1)))."""
    return random.uniform(0, min(cap_s, base_s * 2 ** (attempt - 1)))


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
    ) -> None:
        self._pool = pool
        self._client = client
        self._settings = settings
        self._run_id = run_id
        self._sleep = sleep
        self._stop = stop or asyncio.Event()

    async def claim(self) -> Chunk | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(query("claim_chunk"), self._run_id, self._settings.lease_s)
        return None if row is None else Chunk.from_row(row)

    async def push(self, chunk: Chunk) -> str:
        """Send one chunk until acknowledged, failed, deferred or split; return the outcome."""
        started = datetime.now(UTC)
        clock = time.monotonic()
        attempts = 0
        wait_s = 0.0
        last_error: CriteoError | None = None
        body = self._body(chunk)
        while True:
            wait_s = max(wait_s, self._client.cooldown.remaining_s(), self._client.pacer.reserve())
            if not await self._pause(wait_s):
                # Stopping: a chunk waiting for its next attempt goes back untouched.
                return await self._finish(
                    chunk, "pending", "released", started, attempts, error=last_error
                )
            if not await self._renew_lease(chunk):
                return await self._lease_lost(chunk, started, attempts, None)
            attempts += 1
            try:
                result = await amend(self._client, chunk.target, body, f"syncd-chunk-{chunk.id}")
            except RetryableError as exc:
                last_error = exc
                decision, wait_s = self._after_retryable(chunk, exc, attempts)
                if decision == "failed":
                    return await self._finish(
                        chunk, "failed", "failed", started, attempts, error=exc
                    )
                if decision == "deferred":
                    # Too long to hold a slot: the chunk goes back with a due time instead.
                    return await self._finish(
                        chunk, "pending", "deferred", started, attempts, error=exc, delay_s=wait_s
                    )
                continue
            except RunAbortingError as exc:
                # Not this chunk's fault: hand it back untouched, then stop the run.
                await self._finish(chunk, "pending", "released", started, attempts, error=exc)
                raise
            except PayloadTooLarge as exc:
                if chunk.identifier_count > 1:
                    return await self._split(chunk, started, attempts, exc)
                return await self._finish(chunk, "failed", "failed", started, attempts, error=exc)
            except PermanentError as exc:
                return await self._finish(chunk, "failed", "failed", started, attempts, error=exc)
            outcome = await self._finish(chunk, "done", "acknowledged", started, attempts, result)
            log.info(
                "chunk_pushed",
                chunk_id=chunk.id,
                segment_key=chunk.segment_key,
                operation=chunk.operation,
                identifiers=chunk.identifier_count,
                nb_valid=result.nb_valid,
                nb_invalid=result.nb_invalid,
                attempts=attempts,
                outcome=outcome,
                duration_ms=round((time.monotonic() - clock) * 1000),
            )
            return outcome

    def _body(self, chunk: Chunk) -> AmendmentBody:
        """The chunk's request body, its identifiers read slice by slice as it is sent."""

        async def identifiers() -> AsyncIterator[bytes]:
            async with self._pool.acquire() as conn:
                for start in range(1, chunk.payload_bytes + 1, PAYLOAD_SLICE_BYTES):
                    piece = await conn.fetchval(
                        query("payload_slice"), chunk.id, start, PAYLOAD_SLICE_BYTES, self._run_id
                    )
                    if not piece:
                        return  # no longer ours: the body sees it short and aborts
                    yield piece

        return amendment_body(chunk.target, chunk.operation, chunk.payload_bytes, identifiers)

    def _after_retryable(
        self, chunk: Chunk, error: RetryableError, attempts: int
    ) -> tuple[str, float]:
        """('retry', wait), ('deferred', wait) or ('failed', 0) after a retryable error."""
        s = self._settings
        wait_s = error.retry_after_s
        if error.status == 429:
            self._client.cooldown.trip(wait_s if wait_s is not None else s.retry_base_s)
        if attempts >= s.max_attempts:
            return "failed", 0.0
        if wait_s is None:
            wait_s = backoff_s(attempts, s.retry_base_s, s.retry_max_wait_s)
        if wait_s > s.retry_max_wait_s:
            return "deferred", wait_s
        log.info(
            "chunk_retry",
            chunk_id=chunk.id,
            segment_key=chunk.segment_key,
            attempt=attempts,
            status=error.status,
            error_code=error.code,
            delay_s=round(wait_s, 3),
        )
        return "retry", wait_s

    async def _pause(self, delay_s: float) -> bool:
        """Wait, unless the run is told to stop first; False when stopping."""
        if delay_s > 0 and not self._stop.is_set():
            sleeper = asyncio.ensure_future(self._sleep(delay_s))
            stopper = asyncio.ensure_future(self._stop.wait())
            _, pending = await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
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
        state: str,
        outcome: str,
        started: datetime,
        attempts: int,
        result: AmendmentResult | None = None,
        error: CriteoError | None = None,
        delay_s: float = 0.0,
    ) -> str:
        detail = str(error) if error else None
        async with self._pool.acquire() as conn:
            audit_id = await conn.fetchval(
                query("finish_chunk"),
                chunk.id,
                self._run_id,
                state,
                delay_s,
                result.nb_valid if result else None,
                result.nb_invalid if result else None,
                json.dumps(result.sample_invalid) if result else None,
                result.http_status if result else (error.status if error else None),
                attempts,
                detail,
                outcome,
                error.code if error else None,
                json.dumps(result.warnings) if result and result.warnings else None,
                json.dumps(result.errors) if result and result.errors else None,
                result.contact_list_id if result else None,
                result.request_date if result else None,
                started,
            )
        if audit_id is None:
            return await self._lease_lost(chunk, started, attempts, result)
        if outcome != "acknowledged":
            log.warning(
                "chunk_not_acknowledged",
                chunk_id=chunk.id,
                segment_key=chunk.segment_key,
                operation=chunk.operation,
                identifiers=chunk.identifier_count,
                outcome=outcome,
                status=error.status if error else None,
                error_code=error.code if error else None,
                error=detail,
                attempts=attempts,
                retry_in_s=round(delay_s, 1) if delay_s else None,
            )
        return outcome

    async def _split(
        self, chunk: Chunk, started: datetime, attempts: int, error: PayloadTooLarge
    ) -> str:
        async with self._pool.acquire() as conn:
            audit_id = await conn.fetchval(
                query("split_chunk"),
                chunk.id,
                self._run_id,
                error.status,
                attempts,
                error.code,
                str(error),
                started,
            )
        if audit_id is None:
            return await self._lease_lost(chunk, started, attempts, None)
        log.warning(
            "chunk_split", chunk_id=chunk.id, segment_key=chunk.segment_key, status=error.status
        )
        return "split"

    async def _lease_lost(
        self, chunk: Chunk, started: datetime, attempts: int, result: AmendmentResult | None
    ) -> str:
        async with self._pool.acquire() as conn:
            await conn.execute(
                query("audit_lease_lost"),
                chunk.id,
                self._run_id,
                result.http_status if result else None,
                attempts,
                started,
            )
        log.warning("chunk_lease_lost", chunk_id=chunk.id, segment_key=chunk.segment_key)
        return "lease_lost"
