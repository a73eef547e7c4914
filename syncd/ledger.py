"""The ledger: per Criteo segment, the identifiers Criteo has acknowledged.

Its log is the acknowledged chunks (finish_chunk keeps their payload, in the statement
that records the outcome); `fold` applies that log to syncd.ledger in plan order and
drops the payloads (a clear empties its target's ledger at its place in that order).
Folding is index work (about as much PostgreSQL CPU as planning the same changes), so it
stays off the path to Criteo: the daemon folds after each run, a run folds what earlier
runs left before it plans, and readers (verification, mirror diffs, erasure) fold first.
See sql/0012_ledger.sql and sql/0015_clear_chunks.sql.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from syncd.db import locks, query
from syncd.logging import get_logger

log = get_logger(__name__)

# Chunks per fold transaction: at most 50 x 50,000 identifiers sorted at once, and a
# transaction short enough not to hold up a prune or another fold for long.
FOLD_BATCH_CHUNKS = 50


@dataclass
class Folded:
    chunks: int = 0  # clears included
    added: int = 0
    removed: int = 0  # the identifiers a clear wiped included
    clears: int = 0


async def fold(conn: Any) -> Folded:
    """Fold every acknowledged chunk not folded yet into the ledger, one transaction per
    batch; logs ledger_folded when there was anything to fold.

    A clear empties its target's ledger at its place in plan order: a batch stops short of
    the first clear of the log, and the clear is applied once everything before it is
    folded (in that batch's transaction); the next batch goes on after it."""
    started = time.monotonic()
    total = Folded()
    while True:
        cleared = None
        async with conn.transaction():
            await conn.execute(query("lock_ledger_fold"), locks.LEDGER_LOCK_NAMESPACE, locks.FOLD)
            row = await conn.fetchrow(query("fold_ledger"), FOLD_BATCH_CHUNKS)
            if row["clear_id"] is not None and row["chunks"] < FOLD_BATCH_CHUNKS:
                cleared = await conn.fetchrow(query("fold_clear"), row["clear_id"])
        total.chunks += row["chunks"]
        total.added += row["added"]
        total.removed += row["removed"]
        if cleared is not None:
            total.chunks += cleared["chunks"]
            total.clears += cleared["chunks"]
            total.removed += cleared["removed"]
        if row["chunks"] < FOLD_BATCH_CHUNKS and not (cleared and cleared["chunks"]):
            break
    if total.chunks:
        log.info(
            "ledger_folded",
            chunks=total.chunks,
            added=total.added,
            removed=total.removed,
            clears=total.clears,
            duration_s=round(time.monotonic() - started, 3),
        )
    return total
