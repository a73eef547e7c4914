"""The database: connection pool, dedicated connections, named queries.

Runtime queries live in `syncd/db/queries/*.sql`, one file per concept, as named blocks
(`-- name: x` then a one-line description); a name defined twice fails at load. No SQL
is assembled in Python. Migrations are in `syncd.db.migrations`.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import re
from functools import cache
from typing import Any

import asyncpg

from syncd.config import Settings
from syncd.errors import ConfigError

_QUERY_HEADER = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)


@cache
def load_queries() -> dict[str, str]:
    """Every named query in the package's queries/*.sql files, keyed by name."""
    queries: dict[str, str] = {}
    folder = importlib.resources.files("syncd.db") / "queries"
    for item in sorted(folder.iterdir(), key=lambda f: f.name):
        if not item.name.endswith(".sql"):
            continue
        parts = _QUERY_HEADER.split(item.read_text(encoding="utf-8"))
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in queries:
                raise ValueError(f"query {name!r} is defined twice (again in {item.name})")
            queries[name] = body.strip()
    return queries


def query(name: str) -> str:
    return load_queries()[name]


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int | None = None) -> Any:
    """A small pool: connections are held for claims and finalises, never across HTTP calls."""
    size = max_size or settings.concurrency + settings.plan_concurrency + 2
    try:
        return await asyncpg.create_pool(
            settings.database_url.reveal(),
            min_size=min_size,
            max_size=size,
            command_timeout=600,  # a plan of millions of changes is one statement
            server_settings={"application_name": "syncd"},
        )
    except (OSError, asyncpg.PostgresError, ValueError) as exc:
        raise ConfigError(f"SYNCD_DATABASE_URL: cannot connect ({_describe(exc)})") from None


async def connect(settings: Settings) -> Any:
    """A dedicated connection, outside the pool (its session advisory locks must persist)."""
    try:
        return await asyncpg.connect(
            settings.database_url.reveal(), server_settings={"application_name": "syncd"}
        )
    except (OSError, asyncpg.PostgresError, ValueError) as exc:
        raise ConfigError(f"SYNCD_DATABASE_URL: cannot connect ({_describe(exc)})") from None


def _describe(exc: BaseException) -> str:
    # asyncpg messages never contain the password; the URL itself is never echoed.
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":")


POOL_CLOSE_TIMEOUT_S = 10.0


async def close_pool(pool: Any, timeout_s: float = POOL_CLOSE_TIMEOUT_S) -> None:
    """Close the pool, waiting at most `timeout_s` for connections still held, then
    terminate them: a holder that never gives its connection back (a request body left
    suspended, a bug) must not keep the process from exiting."""
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except TimeoutError:
        pool.terminate()
