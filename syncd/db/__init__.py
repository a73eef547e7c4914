"""The database: connection pool, dedicated connections, named queries.

Runtime queries live in `syncd/db/queries/*.sql`, one file per concept, as named blocks
(`-- name: x` then a one-line description); a name defined twice fails at load. No SQL
is assembled in Python. Migrations are in `syncd.db.migrations`.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import re
import ssl
from functools import cache
from typing import Any

import asyncpg

from syncd.config import Settings
from syncd.errors import ConfigError, DatabaseUnavailable, SyncdError

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
    except _CONNECT_ERRORS as exc:
        raise connect_error(exc, settings.database_url.reveal()) from None


async def connect(settings: Settings) -> Any:
    """A dedicated connection, outside the pool (its session advisory locks must persist)."""
    try:
        return await asyncpg.connect(
            settings.database_url.reveal(), server_settings={"application_name": "syncd"}
        )
    except _CONNECT_ERRORS as exc:
        raise connect_error(exc, settings.database_url.reveal()) from None


# OverflowError: a port the settings let through but the socket refuses.
_CONNECT_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    ValueError,
    OverflowError,
)
# The server did not answer, or answered "not now": the same command may work in a minute.
_UNAVAILABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)
_ENCODE_HINT = "percent-encode reserved characters (/ ? # @ : %) in the user name and password"
PRIVILEGES_HINT = 'the role lacks a privilege syncd needs (see "Database privileges" in the README)'


def connect_error(exc: BaseException, url: str) -> SyncdError:
    """What a failed connection attempt means to the operator, never showing the password."""
    if isinstance(exc, _UNAVAILABLE) and not isinstance(exc, ssl.SSLError):
        reason = _first_line(exc, url) if isinstance(exc, asyncpg.PostgresError) else None
        reason = reason or getattr(exc, "strerror", None) or type(exc).__name__
        return DatabaseUnavailable(f"the database is unavailable ({reason}); try again later")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return ConfigError(f"SYNCD_DATABASE_URL: {_first_line(exc, url)}; {PRIVILEGES_HINT}")
    if isinstance(exc, asyncpg.PostgresError | asyncpg.ClientConfigurationError | ssl.SSLError):
        return ConfigError(f"SYNCD_DATABASE_URL: cannot connect: {_first_line(exc, url)}")
    # A plain ValueError is asyncpg's own URL parsing failing: its text may quote the part
    # of the password that an unencoded '/' or '#' turned into a port, so it is not shown.
    return ConfigError(f"SYNCD_DATABASE_URL: the URL is malformed; {_ENCODE_HINT}")


def _first_line(exc: BaseException, url: str) -> str:
    """The error's first line (PostgreSQL adds DETAIL lines), with no piece of the
    URL's password in it, however mangled the URL (the last '@' ends the password)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    password = url.partition("//")[2].rpartition("@")[0].partition(":")[2]
    for piece in sorted(re.split(r"[/?#@:]", password), key=len, reverse=True):
        if len(piece) >= 3:
            text = text.replace(piece, "***")
    return text


POOL_CLOSE_TIMEOUT_S = 10.0


async def close_pool(pool: Any, timeout_s: float = POOL_CLOSE_TIMEOUT_S) -> None:
    """Close the pool, waiting at most `timeout_s` for connections still held, then
    terminate them: a holder that never gives its connection back (a request body left
    suspended, a bug) must not keep the process from exiting."""
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except TimeoutError:
        pool.terminate()
