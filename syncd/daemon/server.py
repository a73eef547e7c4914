"""The daemon's HTTP server: /healthz, /readyz and /metrics for probes and Prometheus.

Small on purpose: three GET routes on one aiohttp app, no middleware. The probes answer
in bounded time whatever the database does (a stalled server, a failover), because an
orchestrator that waits on a probe kills the process it was meant to watch. Answers say
why in a few plain words, never a URL, a host or a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from syncd.daemon.metrics import (
    CHUNKS_FAILED,
    CHUNKS_PENDING,
    READY,
    REGISTRY,
    SEGMENTS_BLOCKED,
)
from syncd.db import query
from syncd.db.migrations import pending_migrations

# One probe of the database (connect, migrations, gauges) takes at most this long: well
# below the few seconds Kubernetes gives a probe by default (timeoutSeconds: 1 to 5).
PROBE_TIMEOUT_S = 3.0
# Closing takes at most this long: answers still being written are dropped after it (a
# scrape in flight at shutdown is expendable; the shutdown grace is for pushes).
CLOSE_TIMEOUT_S = 2.0

_POOL: web.AppKey[Any] = web.AppKey("pool")
_ALIVE: web.AppKey[Callable[[], bool]] = web.AppKey("alive")


@dataclass(frozen=True)
class _Probe:
    """What one look at the database found: why it is not ready (None: ready), and the
    chunk gauges when they could be read."""

    not_ready: str | None
    pending: int | None = None
    failed: int | None = None
    blocked: int | None = None


async def _probe(pool: Any) -> _Probe:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S), pool.acquire() as conn:
            behind = await pending_migrations(conn)
            if behind:
                return _Probe(f"{len(behind)} migration(s) pending; run `syncd migrate`")
            row = await conn.fetchrow(query("chunk_gauges"))
    except TimeoutError:
        return _Probe("the database did not answer in time")
    except Exception as exc:  # a probe answers, whatever the failure
        # The type only: a driver's message may quote the host or the user.
        return _Probe(f"database unreachable ({type(exc).__name__})")
    return _Probe(None, row["pending"], row["failed"], row["blocked"])


def _refresh(probe: _Probe) -> None:
    READY.set(0 if probe.not_ready else 1)
    # Unread gauges keep their last value: READY=0 says they may be stale.
    if probe.pending is not None:
        CHUNKS_PENDING.set(probe.pending)
    if probe.failed is not None:
        CHUNKS_FAILED.set(probe.failed)
    if probe.blocked is not None:
        SEGMENTS_BLOCKED.set(probe.blocked)


async def _healthz(request: web.Request) -> web.Response:
    if request.app[_ALIVE]():
        return web.Response(text="alive")
    return web.Response(status=503, text="not alive")


async def _readyz(request: web.Request) -> web.Response:
    probe = await _probe(request.app[_POOL])
    _refresh(probe)
    if probe.not_ready:
        return web.Response(status=503, text=f"not ready: {probe.not_ready}")
    return web.Response(text="ready")


async def _metrics(request: web.Request) -> web.Response:
    _refresh(await _probe(request.app[_POOL]))
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


@contextlib.asynccontextmanager
async def http_server(
    pool: Any, *, alive: Callable[[], bool], host: str, port: int
) -> AsyncIterator[int]:
    """Serve /healthz, /readyz and /metrics on host:port while the block runs; yield the
    bound port (port 0 binds a free one: tests; SYNCD_HTTP_PORT=0 means the caller does
    not start the server at all)."""
    app = web.Application()
    app[_POOL] = pool
    app[_ALIVE] = alive
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    # aiohttp waits up to shutdown_timeout twice (for handlers to end, then once they are
    # cancelled): half the bound each.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=CLOSE_TIMEOUT_S / 2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        # Bounded even if aiohttp's own bound changes: a scrape stuck on the database must
        # not hold the shutdown.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runner.cleanup(), CLOSE_TIMEOUT_S + 0.5)
