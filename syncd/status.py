"""What `syncd status` reads: recent runs, open, failed and unsendable chunks, waiting
changes. The queries are in db/queries/status.sql; report.status_text formats the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from syncd.db import query

FAILED_CHUNKS_SHOWN = 20


@dataclass
class Status:
    runs_asked: int
    recent_runs: list[Any] = field(default_factory=list)
    open_chunks: list[Any] = field(default_factory=list)
    failed_chunks: list[Any] = field(default_factory=list)
    unsendable_chunks: list[Any] = field(default_factory=list)
    waiting_linked: int = 0
    waiting_unlinked: list[Any] = field(default_factory=list)
    budgets: list[Any] = field(default_factory=list)  # each Criteo app's call budget


async def read(conn: Any, runs: int = 5) -> Status:
    return Status(
        runs_asked=runs,
        recent_runs=list(await conn.fetch(query("recent_runs"), runs)) if runs else [],
        open_chunks=list(await conn.fetch(query("open_chunks_summary"))),
        failed_chunks=list(await conn.fetch(query("failed_chunks"), FAILED_CHUNKS_SHOWN)),
        unsendable_chunks=list(await conn.fetch(query("unsendable_chunks"))),
        waiting_linked=await conn.fetchval(query("waiting_linked")),
        waiting_unlinked=list(await conn.fetch(query("waiting_unlinked"))),
        budgets=list(await conn.fetch(query("budget_use"))),
    )
