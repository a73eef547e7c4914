"""Each Criteo app's call budget, shared by every process through PostgreSQL.

Replicas of `syncd run`, a manual `syncd sync` beside them and the pushers of one process
all draw on one budget per app: each call is reserved by one atomic statement
(`reserve_call`, GCRA on the app's row), and a "nothing left until T" from Criteo holds
every process until T. No lock is held across an HTTP call; a reservation is one short
transaction of its own.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from syncd.db import query
from syncd.logging import get_logger

log = get_logger(__name__)


class SharedBudget:
    """The budgets table, through the process's pool."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def reserve(
        self, app: str, interval_s: float, tolerance_s: float, per_minute: int | None
    ) -> float:
        """Reserve one call; the seconds to wait before making it."""
        async with self._pool.acquire() as conn:
            wait = await conn.fetchval(
                query("reserve_call"), app, interval_s, tolerance_s, per_minute
            )
        return float(wait)

    async def hold(self, app: str, until_epoch_s: float, tolerance_s: float) -> None:
        await self._bookkeeping(app, query("hold_budget"), until_epoch_s, tolerance_s)

    async def note_limit(self, app: str, per_minute: int | None) -> None:
        await self._bookkeeping(app, query("note_limit"), per_minute)

    async def rate_limited(self, app: str) -> None:
        await self._bookkeeping(app, query("count_rate_limited"))

    async def _bookkeeping(self, app: str, statement: str, *args: Any) -> None:
        """Write what an answer taught, for every process. A database error here must not
        turn an answer Criteo gave into a failed request (the chunk's own finish says
        whether the database is reachable): it is logged and dropped."""
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(statement, app, *args)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("budget_update_failed", app=app, error_type=type(exc).__name__)


async def budget_use(conn: Any) -> list[dict[str, Any]]:
    """Each app's use of its budget (for `syncd status` and the run summary)."""
    return [dict(r) for r in await conn.fetch(query("budget_use"))]
