"""Post-window verification: what Criteo says each linked list holds, against what syncd
has acknowledged.

Some hours after each window (SYNCD_VERIFY_AFTER_HOURS, Criteo's computation time), the
daemon folds the ledger, reads every linked segment's contact-list statistics and logs
`segment_verified`, or `segment_diverged` (warning) when Criteo's identifier count and the
ledger's differ by more than SYNCD_VERIFY_TOLERANCE of the ledger's. One replica verifies
each window (the row only one insert wins); every reading is kept in syncd.segment_stats.
"""

from __future__ import annotations

import datetime as dt
import socket
from typing import Any

from syncd import ledger, segments
from syncd.db import query
from syncd.logging import get_logger
from syncd.runtime import Runtime

log = get_logger(__name__)


def diverged(criteo: int, acknowledged: int, tolerance: float) -> bool:
    """Whether Criteo's count is off syncd's by more than `tolerance` of syncd's (an
    empty ledger against a non-empty list is off by everything)."""
    return abs(criteo - acknowledged) > tolerance * max(acknowledged, 1)


async def verify_window(runtime: Runtime, window: dt.datetime) -> list[segments.Reading] | None:
    """Verify every linked segment for `window`; None when another replica has it."""
    tolerance = runtime.settings.verify_tolerance
    async with runtime.pool.acquire() as conn:
        if await conn.fetchval(query("claim_verification"), window, socket.gethostname()) is None:
            return None
        await ledger.fold(conn)  # readers fold first: the ledger is then whole

        async def acknowledged(link: Any) -> int:
            count = await conn.fetchval(
                query("ledger_count"), link["api"], link["criteo_segment_id"]
            )
            return int(count)

        readings = await segments.read_statistics(
            conn, runtime.criteo, None, window=window, acknowledged=acknowledged
        )
    for r in readings:
        _log(r, window, tolerance)
    return readings


def _log(r: segments.Reading, window: dt.datetime, tolerance: float) -> None:
    if r.error is not None:
        return  # said as segment_stats_failed
    ours = r.acknowledged or 0
    theirs = None if r.statistics is None else r.statistics.identifiers
    if theirs is not None and diverged(theirs, ours, tolerance):
        log.warning(
            "segment_diverged",
            segment_key=r.segment_key,
            criteo_segment_id=r.criteo_segment_id,
            window=window.isoformat(),
            criteo_identifiers=theirs,
            acknowledged=ours,
            difference=theirs - ours,
            tolerance=tolerance,
        )
        return
    log.info(
        "segment_verified",
        segment_key=r.segment_key,
        criteo_segment_id=r.criteo_segment_id,
        window=window.isoformat(),
        criteo_identifiers=theirs,
        acknowledged=ours,
        difference=None if theirs is None else theirs - ours,
        verdict="not_supported" if theirs is None else "match",
    )
