"""Mirror links: a segment's membership read from a relation the CRM keeps (a table, a view,
a dbt model) with the columns `segment_key` and `identifier`, instead of a change log.

Each plan diffs the relation's rows of the key against what Criteo has of the target (the
ledger, overlaid with chunks not folded into it yet) inside PostgreSQL, and writes only
the difference as ordinary chunks: the same outbox, ordering, audit and crash safety as
change-log plans. Python never holds a segment's membership. See db/queries/mirror.sql.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from syncd.db import query
from syncd.errors import SyncdError, UsageError

# The safety net of incremental diffs (sql/0017_mirror_rows.sql): a full one at least this
# often. Under SYNCD_RETENTION_DAYS' minimum (1 day), so no plan it must see is pruned first.
FULL_DIFF_EVERY_HOURS = 20

# Relations rows can be read from: table, view, materialized view, partitioned, foreign.
_READABLE_KINDS = {"r", "v", "m", "p", "f"}
# Column types whose values are text as they are (varchar, char, citext compare as text).
_TEXT_TYPES = ("text", "character varying", "character", "citext", "name")


@dataclass(frozen=True)
class MirrorDiff:
    rows_read: int
    rejected: int
    members: int  # what Criteo has of the target before this plan
    adds: int
    removes: int
    chunks: int
    suppressed: int  # adds left out: the identifier is suppressed (syncd.suppressions)


async def resolve_relation(conn: Any, name: str) -> str:
    """The relation a link names, checked (it exists, syncd may read it, it has text columns
    segment_key and identifier) and resolved to the name stored with the link. UsageError
    naming what is wrong otherwise."""
    try:
        row = await conn.fetchrow(query("mirror_relation_columns"), name)
    except asyncpg.PostgresError as exc:  # to_regclass refuses malformed names
        raise UsageError(f"--mirror {name!r} is not a relation name: {exc.args[0]}") from None
    problem = relation_problem(row, name)
    if problem is not None:
        raise UsageError(f"--mirror {problem}")
    return str(row["resolved"])


def relation_problem(row: Any, name: str) -> str | None:
    """What makes a relation unusable as a mirror source (None: nothing). Said by name, so
    that linking and a later plan (the relation dropped or changed by a deploy) say the
    same thing."""
    if row is None:
        return f"relation {name} does not exist"
    if row["kind"] not in _READABLE_KINDS:
        return f"{name} is not a table or a view"
    if not row["readable"]:
        return f"syncd's database role may not read {name} (GRANT SELECT ON it)"
    for column in ("segment_key", "identifier"):
        found = row[f"{column}_type"]
        if found is None:
            return f"{name} has no column {column} (a mirror source needs segment_key, identifier)"
        if not str(found).startswith(_TEXT_TYPES):
            return f"{name}.{column} is {found}, not text"
    return None


async def diff(conn: Any, run_id: int, plan_id: int, link: Any, chunk_size: int) -> MirrorDiff:
    """Plan a mirror link's difference into chunks of plan `plan_id`, in the caller's
    transaction."""
    found = await fill_net(conn, run_id, plan_id, link)
    written = await chunk_net(conn, plan_id, link, chunk_size)
    return MirrorDiff(
        rows_read=found["rows_read"],
        rejected=found["rejected"],
        members=found["members"],
        adds=written["adds"],
        removes=written["removes"],
        chunks=written["chunks"],
        suppressed=written["suppressed"],
    )


async def fill_net(
    conn: Any, run_id: int | None, plan_id: int | None, link: Any, *, rebuild: bool = False
) -> Any:
    """Write the link's difference into the transaction's plan_net (chunk_net cuts it),
    recording new rejections under the run and plan. `rebuild` (a resync, no run): every
    member is an add. A relation that is gone or changed fails by name: a missing source
    never counts as empty, so it never removes anyone."""
    relation = link["mirror_relation"]
    problem = relation_problem(
        await conn.fetchrow(query("mirror_relation_columns"), relation), relation
    )
    if problem is not None:
        raise SyncdError(
            f"mirror source of {link['segment_key']!r}: {problem}; nothing planned, nothing "
            "removed (restore it, or re-link the key)"
        )
    await conn.execute(query("plan_net_table"))
    target = (link["api"], link["criteo_segment_id"])
    if run_id is None:  # a resync: everything is an add, and the next diff is full
        await conn.execute(query("forget_mirror_state"), link["segment_key"])
        return await _full(conn, run_id, plan_id, link, rebuild=rebuild)
    incremental = await conn.fetchval(
        query("mirror_incremental"),
        link["segment_key"],
        *target,
        relation,
        link["identifier_type"],
        FULL_DIFF_EVERY_HOURS,
    )
    if incremental:
        found = await conn.fetchrow(
            query("mirror_delta"),
            plan_id,
            link["segment_key"],
            link["identifier_type"],
            run_id,
            relation,
            link["send_as"],
        )
    else:
        found = await _full(conn, run_id, plan_id, link, rebuild=False)
    await conn.execute(
        query("record_mirror_state"),
        link["segment_key"],
        plan_id,
        *target,
        relation,
        link["identifier_type"],
        not incremental,
    )
    return found


async def _full(
    conn: Any, run_id: int | None, plan_id: int | None, link: Any, *, rebuild: bool
) -> Any:
    """The whole relation against what Criteo has (the ledger and the chunks on their way),
    both ways; the key's mirror_rows rewritten."""
    return await conn.fetchrow(
        query("mirror_diff"),
        plan_id,
        link["segment_key"],
        link["identifier_type"],
        run_id,
        link["api"],
        link["criteo_segment_id"],
        link["mirror_relation"],
        rebuild,
        link["send_as"],
    )


async def chunk_net(conn: Any, plan_id: int, link: Any, chunk_size: int) -> Any:
    """Cut the session's plan_net into chunks of plan `plan_id` for the link's target."""
    return await conn.fetchrow(
        query("chunk_net"),
        plan_id,
        link["segment_key"],
        link["identifier_type"],
        link["send_as"],
        link["app"],
        chunk_size,
        link["api"],
        link["criteo_segment_id"],
        link["account_id"],
        link["gum_caller_id"],
    )
