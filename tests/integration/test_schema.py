"""Migrations and the inbox contract, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from syncd.db import migrations as db
from syncd.errors import MigrationError


async def test_migrate_is_idempotent_and_recorded(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        every = [m.name for m in db.load_migrations()]
        assert every[:3] == [
            "0001_init.sql",
            "0002_partition_inbox.sql",
            "0003_cheaper_normalisation.sql",
        ]
        assert await db.pending_migrations(conn) == every
        assert await db.migrate(conn) == every
        assert await db.migrate(conn) == []
        rows = await conn.fetch("SELECT version, checksum FROM syncd.schema_migrations")
        assert [(r["version"], r["checksum"]) for r in rows] == [
            (m.version, m.checksum) for m in db.load_migrations()
        ]
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_once(empty_database_url: str) -> None:
    conns = [await asyncpg.connect(empty_database_url) for _ in range(5)]
    try:
        results = await asyncio.gather(*(db.migrate(c) for c in conns))
        every = len(db.load_migrations())
        assert sorted(len(r) for r in results) == [0, 0, 0, 0, every]
        assert await conns[0].fetchval("SELECT count(*) FROM syncd.schema_migrations") == every
    finally:
        for c in conns:
            await c.close()


async def test_changed_migration_is_refused(empty_database_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_one.sql").write_text("CREATE SCHEMA IF NOT EXISTS syncd;")
    conn = await asyncpg.connect(empty_database_url)
    try:
        await db.migrate(conn, tmp_path)
        (tmp_path / "0001_one.sql").write_text("CREATE SCHEMA IF NOT EXISTS syncd; -- edited")
        with pytest.raises(MigrationError, match=r"0001_one\.sql changed after it was applied"):
            await db.migrate(conn, tmp_path)
    finally:
        await conn.close()


async def test_unmigrated_database_is_named(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        with pytest.raises(MigrationError, match="run `syncd migrate`"):
            await db.check_schema(conn)
    finally:
        await conn.close()


async def test_inbox_enforces_operation(conn: Any) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(
            "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
            "VALUES ('k', 'a@b.c', 'ADD')"
        )
    await conn.execute(
        "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
        "VALUES ('k', NULL, 'remove')"
    )
    row = await conn.fetchrow("SELECT * FROM syncd.membership_changes")
    assert row["changed_at"] is not None and row["id"] >= 1


async def test_segment_links_are_checked_by_the_database(conn: Any) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(
            "INSERT INTO syncd.segments (segment_key, api, criteo_segment_id, identifier_type)"
            " VALUES ('k', 'retail-media', '1', 'madid')"
        )


async def test_partitioning_the_inbox_keeps_waiting_changes(
    empty_database_url: str, tmp_path: Path
) -> None:
    """0002 moves changes already waiting into the partitioned inbox, ids and all."""
    first = tmp_path / "first"
    first.mkdir()
    (first / "0001_init.sql").write_text((db.migrations_dir() / "0001_init.sql").read_text())
    conn = await asyncpg.connect(empty_database_url)
    try:
        await db.migrate(conn, first)
        await conn.execute(
            "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
            "SELECT 'k' || (g % 3), 'u' || g || '@x.com', 'add' FROM generate_series(1, 50) g"
        )
        before = await conn.fetch("SELECT * FROM syncd.membership_changes ORDER BY id")
        assert await db.migrate(conn) == [m.name for m in db.load_migrations()][1:]
        after = await conn.fetch("SELECT * FROM syncd.membership_changes ORDER BY id")
        assert [dict(r) for r in after] == [dict(r) for r in before]
        new_id = await conn.fetchval(
            "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
            "VALUES ('k1', 'new@x.com', 'remove') RETURNING id"
        )
        assert new_id == before[-1]["id"] + 1
        partitions = await conn.fetchval(
            "SELECT count(*) FROM pg_inherits "
            "WHERE inhparent = 'syncd.membership_changes'::regclass"
        )
        assert partitions == 16
    finally:
        await conn.close()


async def test_upgrade_keeps_open_chunk_payloads(empty_database_url: str, tmp_path: Path) -> None:
    """0004 turns a chunk's stored identifiers into the JSON bytes sent, for chunks still
    open at the upgrade; acknowledged ones stay empty."""
    first = tmp_path / "first"
    first.mkdir()
    for m in db.load_migrations()[:3]:
        (first / m.name).write_text(m.sql)
    conn = await asyncpg.connect(empty_database_url)
    try:
        await db.migrate(conn, first)
        run_id = await conn.fetchval(
            "INSERT INTO syncd.sync_runs (host, pid, target_window) "
            "VALUES ('t', 1, now()) RETURNING id"
        )
        plan_id = await conn.fetchval(
            "INSERT INTO syncd.plans (run_id, segment_key) VALUES ($1, 'k') RETURNING id", run_id
        )
        await conn.execute(
            "INSERT INTO syncd.chunks (plan_id, segment_key, operation, identifier_type, "
            "identifiers, identifier_count, state) VALUES "
            "($1, 'k', 'add', 'customerId', ARRAY['a\"1', 'b\\2', 'é'], 3, 'pending'), "
            "($1, 'k', 'add', 'customerId', NULL, 2, 'done')",
            plan_id,
        )
        await db.migrate(conn)
        rows = await conn.fetch("SELECT state, payload FROM syncd.chunks ORDER BY id")
        assert json.loads(rows[0]["payload"]) == ['a"1', "b\\2", "é"]
        assert (rows[1]["state"], rows[1]["payload"]) == ("done", None)
    finally:
        await conn.close()
