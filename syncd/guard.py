"""The mass-removal guard: a plan that would remove more than SYNCD_MAX_REMOVE_FRACTION of a
segment's acknowledged members is not sent.

The incident it stops is every reverse-ETL tool's worst: a mirror source truncated, or a
view broken by a deploy, or a CRM bug writing a million removes, and the next sync
empties a live audience. The plan is rolled back whole (a change log's changes stay in
the inbox), the link records the block, and `syncd approve KEY` lets the next plan of the
segment through as it is then; a later plan that no longer removes that much (the source
filled again) needs no approval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from syncd.db import query
from syncd.errors import UsageError


@dataclass(frozen=True)
class Assessment:
    members: int  # acknowledged members of the segment before the plan
    removals: int  # how many of them the plan removes
    blocked: bool


def over_limit(removals: int, members: int, max_fraction: float) -> bool:
    """Whether removing `removals` of `members` is more than the guard allows (1: no guard).
    A segment with no acknowledged member has nobody to lose."""
    return max_fraction < 1 and removals > max_fraction * members


async def assess_change_log(
    conn: Any, link: Any, plan_id: int, removes: int, max_fraction: float
) -> Assessment | None:
    """The guard's verdict on a change-log plan, in its transaction (None: nothing to
    assess). Cheap on the hot path: the ledger is counted only for a plan with removes, and
    its removes are matched against the ledger only when they could be over the limit."""
    if not removes or max_fraction >= 1:
        return None
    members = int(
        await conn.fetchval(query("acknowledged_members"), link["api"], link["criteo_segment_id"])
    )
    if not over_limit(removes, members, max_fraction):
        return Assessment(members, removes, blocked=False)
    removals = int(await conn.fetchval(query("removals_of_members"), plan_id))
    return Assessment(members, removals, over_limit(removals, members, max_fraction))


def block_message(segment_key: str, removals: int, members: int, max_fraction: float) -> str:
    return (
        f"the plan of {segment_key!r} would remove {removals} of its {members} acknowledged "
        f"members, more than SYNCD_MAX_REMOVE_FRACTION ({max_fraction:g}) allows: nothing of "
        f"it was sent. If the source is right, `syncd approve {segment_key}` lets the next "
        "sync push it; if it is not (a truncated table, a broken view), fix it and the next "
        "sync needs no approval"
    )


async def approve(conn: Any, segment_key: str) -> tuple[int, int]:
    """`syncd approve KEY`: the next plan of a blocked segment goes through. Returns the
    blocked plan's removals and members; UsageError when nothing is blocked."""
    row = await conn.fetchrow(query("approve_removals"), segment_key)
    if row is None:
        linked = await conn.fetchval(query("get_segment"), segment_key)
        if linked is None:
            raise UsageError(f"{segment_key!r} is not linked")
        raise UsageError(f"{segment_key!r} has no blocked plan: there is nothing to approve")
    return int(row["blocked_removes"]), int(row["blocked_members"])
