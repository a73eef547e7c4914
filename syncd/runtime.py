"""What one process opens once and keeps: the database pool and, per Criteo app, one
client holding its HTTP session, its token, its pacing and its cool-down.

`syncd sync` opens a runtime for its single run; the daemon keeps one for its whole
life, so back-to-back runs share one token and one pacing budget instead of each
starting with a fresh minute's burst of calls and a new token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from syncd import db
from syncd.budget import SharedBudget
from syncd.config import Settings

if TYPE_CHECKING:
    from syncd.criteo import CriteoClient

DEFAULT_APP = "default"


def _client_class() -> type[CriteoClient]:
    """Importing aiohttp costs about 0.2 s of CPU: a runtime imports it in a thread, the
    first time a run needs Criteo, while that run's first segments are being planned."""
    from syncd.criteo import CriteoClient

    return CriteoClient


class Runtime:
    """The long-lived resources of one process. Open it with `Runtime.open(settings)`."""

    def __init__(self, settings: Settings, pool: Any, stack: contextlib.AsyncExitStack) -> None:
        self.settings = settings
        self.pool = pool
        self._stack = stack
        self._clients: dict[str, CriteoClient] = {}
        self._opening = asyncio.Lock()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Runtime]:
        async with contextlib.AsyncExitStack() as stack:
            pool = await db.create_pool(settings)
            stack.push_async_callback(db.close_pool, pool)
            yield cls(settings, pool, stack)

    async def criteo(self, app: str = DEFAULT_APP) -> CriteoClient:
        """The client of one Criteo app, opened on first use and kept until the end."""
        async with self._opening:
            client = self._clients.get(app)
            if client is None:
                client_class = await asyncio.to_thread(_client_class)
                # Its budget is shared with every process through the database.
                opening = client_class.open(self.settings, app, SharedBudget(self.pool))
                client = await self._stack.enter_async_context(opening)
                self._clients[app] = client
            return client

    def new_run(self) -> None:
        """A run starts: each client notes what Criteo says of the API version afresh."""
        for client in self._clients.values():
            client.new_run()

    def api_notice(self) -> tuple[bool, float | None]:
        """Whether Criteo called the API version deprecated during this run, and the
        latest sunset date it gave (Unix time)."""
        clients = list(self._clients.values())
        deprecated = any(c.deprecated for c in clients)
        sunsets = [c.sunset for c in clients if c.sunset is not None]
        return deprecated, max(sunsets) if sunsets else None

    def talked_to_criteo(self) -> bool:
        return bool(self._clients)
