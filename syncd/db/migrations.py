"""Migrations: the numbered `sql/NNNN_*.sql` files, applied in order under a blocking
lock, each recorded with its checksum so that a changed file is refused."""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncd.db import query
from syncd.db.locks import MIGRATE, MIGRATION_LOCK_NAMESPACE
from syncd.errors import MigrationError
from syncd.logging import get_logger

log = get_logger(__name__)

_MIGRATION_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations_dir() -> Path:
    """The sql/ folder of a checkout, or the copy packaged as syncd.migrations."""
    checkout = Path(__file__).resolve().parents[2] / "sql"
    if (checkout / "0001_init.sql").is_file():
        return checkout
    return Path(str(importlib.resources.files("syncd.migrations")))


def load_migrations(folder: Path | None = None) -> list[Migration]:
    folder = folder or migrations_dir()
    found = []
    for path in sorted(folder.iterdir()):
        match = _MIGRATION_FILE.match(path.name)
        if match:
            found.append(Migration(match.group(1), path.name, path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a number in {folder}")
    return found


async def migrate(conn: Any, folder: Path | None = None) -> list[str]:
    """Apply the migrations not applied yet, in order; return the names applied.

    One transaction under a blocking transaction-scoped advisory lock: a second
    process running this at the same moment waits, then finds nothing to do.
    """
    wanted = load_migrations(folder)
    applied_now: list[str] = []
    async with conn.transaction():
        # A namespace of its own: never the key of a run's liveness lock (syncd.db.locks).
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1, $2)", MIGRATION_LOCK_NAMESPACE, MIGRATE
        )
        await conn.execute(query("create_migrations_table"))
        done = {r["version"]: r for r in await conn.fetch(query("applied_migrations"))}
        for migration in wanted:
            previous = done.get(migration.version)
            if previous is not None:
                if previous["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"{migration.name} changed after it was applied "
                        f"(applied as {previous['name']}); add a new migration instead"
                    )
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                query("record_migration"), migration.version, migration.name, migration.checksum
            )
            applied_now.append(migration.name)
    for name in applied_now:
        log.info("migration_applied", migration=name)
    return applied_now


async def check_schema(conn: Any) -> None:
    """Fail with a clear message when `syncd migrate` has not been run."""
    pending = await pending_migrations(conn)
    if pending:
        raise MigrationError(
            f"the database schema is not up to date ({len(pending)} migration(s) pending, "
            f"first {pending[0]}); run `syncd migrate`"
        )


async def pending_migrations(conn: Any) -> list[str]:
    exists = await conn.fetchval("SELECT to_regclass('syncd.schema_migrations') IS NOT NULL")
    applied = (
        {r["version"] for r in await conn.fetch(query("applied_migrations"))} if exists else set()
    )
    return [m.name for m in load_migrations() if m.version not in applied]
