"""Segment lifecycle over Criteo's API, what `syncd segments create / search / rename /
delete / stats` do: each Criteo call first, the local record only once Criteo confirmed,
so a refusal (partial approval) records nothing locally.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from syncd import links
from syncd.criteo import segments as remote
from syncd.criteo.client import CriteoClient
from syncd.db import query
from syncd.errors import CriteoError, RunAbortingError, UsageError
from syncd.identifiers import RETAIL_MEDIA
from syncd.logging import get_logger
from syncd.runtime import DEFAULT_APP

log = get_logger(__name__)

# The client of a Criteo app by name (Runtime.criteo): each link is served by its own app.
Clients = Callable[[str], Awaitable[CriteoClient]]


async def create_and_link(
    conn: Any,
    client: CriteoClient,
    wanted: links.Link,
    *,
    name: str,
    description: str | None,
    retailer_id: str | None,
) -> tuple[remote.RemoteSegment, links.LinkOutcome]:
    """Create the contact-list segment on Criteo, then link the key to it.

    Everything Criteo would refuse that syncd can see is checked first, so that a
    segment is not created for a link that cannot be made."""
    if wanted.account_id is None:
        flag = "--account-id" if wanted.api == RETAIL_MEDIA else "--advertiser-id"
        raise UsageError(f"creating a {wanted.api} segment needs {flag}")
    if wanted.api == RETAIL_MEDIA and retailer_id is None:
        raise UsageError("creating a retail-media segment needs --retailer-id")
    checked = links.validate(replace(wanted, criteo_segment_id="0"))
    if await conn.fetchrow(query("get_segment"), wanted.segment_key) is not None:
        raise UsageError(
            f"{wanted.segment_key!r} is linked already; unlink it first, or link it to an "
            "existing segment with `syncd segments link --force`"
        )
    created = await remote.create(
        client,
        checked.api,
        name=name,
        description=description,
        identifier_type=checked.identifier_type,
        account_id=wanted.account_id,
        retailer_id=retailer_id,
    )
    outcome = await links.link(conn, replace(checked, criteo_segment_id=created.id))
    return created, outcome


async def _linked(conn: Any, segment_key: str) -> Any:
    row = await conn.fetchrow(query("get_segment"), segment_key)
    if row is None:
        raise UsageError(f"{segment_key!r} is not linked")
    return row


async def rename(
    conn: Any, clients: Clients, segment_key: str, name: str, description: str | None
) -> remote.RemoteSegment:
    link = await _linked(conn, segment_key)
    client = await clients(link["app"] or DEFAULT_APP)
    return await remote.rename(
        client, link["api"], link["account_id"], link["criteo_segment_id"], name, description
    )


async def delete(conn: Any, clients: Clients, segment_key: str, *, force: bool) -> int:
    """Delete the linked segment on Criteo, then unlink the key. Refused while chunks are
    open unless forced (they are then dropped with the link); nothing is unlinked when
    Criteo refuses the deletion. Returns the chunks dropped."""
    link = await _linked(conn, segment_key)
    open_chunks = sum(
        r["chunks"] for r in await conn.fetch(query("open_chunk_targets"), segment_key)
    )
    if open_chunks and not force:
        raise UsageError(
            f"{segment_key!r} has {open_chunks} chunk(s) not yet acknowledged by Criteo; "
            "run `syncd sync` first, or delete with --force to drop them"
        )
    client = await clients(link["app"] or DEFAULT_APP)
    await remote.delete(client, link["api"], link["account_id"], link["criteo_segment_id"])
    return await links.unlink(conn, segment_key, force=True)


@dataclass(frozen=True)
class Reading:
    segment_key: str
    api: str
    criteo_segment_id: str
    statistics: remote.Statistics | None  # None: Criteo does not compute them for this list
    read_at: Any
    acknowledged: int | None = None  # a verification's: the ledger's count for the segment
    error: str | None = None  # Criteo refused this segment's statistics: its code


async def read_statistics(
    conn: Any,
    clients: Clients,
    segment_key: str | None,
    *,
    window: Any = None,
    acknowledged: Callable[[Any], Awaitable[int]] | None = None,
) -> list[Reading]:
    """Read Criteo's statistics for one linked segment or all, and record each reading;
    for a verification (`window`), with the count syncd has acknowledged for each."""
    if segment_key is not None:
        rows = [await _linked(conn, segment_key)]
    else:
        rows = await links.list_links(conn)
    readings = []
    for link in rows:
        client = await clients(link["app"] or DEFAULT_APP)
        try:
            stats = await remote.statistics(
                client, link["api"], link["account_id"], link["criteo_segment_id"]
            )
        except RunAbortingError:
            raise  # bad credentials, a retired version: every other segment would fail too
        except CriteoError as exc:
            # One segment refused (Criteo no longer knows it, say): said, and the others read.
            log.warning(
                "segment_stats_failed",
                segment_key=link["segment_key"],
                criteo_segment_id=link["criteo_segment_id"],
                error_code=exc.code,
                status=exc.status,
            )
            failed = Reading(
                link["segment_key"], link["api"], link["criteo_segment_id"], None, None,
                error=exc.code or f"HTTP {exc.status}",
            )  # fmt: skip
            readings.append(failed)
            continue
        ours = None if acknowledged is None else await acknowledged(link)
        read_at = await conn.fetchval(
            query("insert_segment_stats"),
            link["segment_key"],
            link["api"],
            link["criteo_segment_id"],
            stats is not None,
            stats.identifiers if stats else None,
            stats.matches if stats else None,
            stats.match_rate if stats else None,
            ours,
            window,
        )
        key, api, segment_id = link["segment_key"], link["api"], link["criteo_segment_id"]
        readings.append(Reading(key, api, segment_id, stats, read_at, ours))
    return readings
