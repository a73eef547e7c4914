"""The `syncd segments create / search / rename / delete / stats` handlers: open the
runtime (pool and Criteo client), call syncd.segments, print one table or line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from syncd import links, report, segments
from syncd.config import Settings
from syncd.criteo import segments as remote
from syncd.db.migrations import check_schema
from syncd.identifiers import MARKETING_SOLUTIONS, RETAIL_MEDIA
from syncd.runtime import Runtime


async def run_segment_command(settings: Settings, args: argparse.Namespace) -> int:
    async with Runtime.open(settings) as runtime, runtime.pool.acquire() as conn:
        await check_schema(conn)
        command = args.segments_command
        if command == "create":
            settings.app(args.app)  # an unknown app: ConfigError naming it, before any call
            return await _create(conn, await runtime.criteo(args.app), args)
        if command == "search":
            settings.app(args.app)
            return await _search(conn, await runtime.criteo(args.app), args)
        if command == "rename":
            renamed = await segments.rename(
                conn, runtime.criteo, args.key, args.name, args.description
            )
            print(f"renamed {args.key} -> segment {renamed.id} {renamed.name!r}")
            return 0
        if command == "delete":
            dropped = await segments.delete(conn, runtime.criteo, args.key, force=args.force)
            extra = f" (dropped {dropped} unsent chunk(s))" if dropped else ""
            print(f"deleted the segment of {args.key} on Criteo and unlinked it{extra}")
            return 0
        readings = await segments.read_statistics(conn, runtime.criteo, args.key)
        print(statistics_table(readings))
        return 1 if any(r.error for r in readings) else 0


async def _create(conn: Any, client: Any, args: argparse.Namespace) -> int:
    api = RETAIL_MEDIA if args.account_id else MARKETING_SOLUTIONS
    wanted = links.Link(
        segment_key=args.key,
        criteo_segment_id="0",  # Criteo gives the id
        identifier_type=args.identifier_type,
        api=api,
        send_as=args.send_as,
        account_id=args.account_id or args.advertiser_id,
        app=args.app,
    )
    created, outcome = await segments.create_and_link(
        conn,
        client,
        wanted,
        name=args.name,
        description=args.description,
        retailer_id=args.retailer_id,
    )
    print(f"created {api} segment {created.id} {created.name!r}; {outcome.summary}")
    return 0


async def _search(conn: Any, client: Any, args: argparse.Namespace) -> int:
    api = RETAIL_MEDIA if args.account_id else MARKETING_SOLUTIONS
    found = await remote.search(client, api, args.account_id or args.advertiser_id, args.name)
    linked = {
        (r["api"], r["criteo_segment_id"]): r["segment_key"] for r in await links.list_links(conn)
    }
    print(search_table(found, {sid: key for (a, sid), key in linked.items() if a == api}))
    return 0


def search_table(found: Sequence[Any], linked: dict[str, str]) -> str:
    """Segments Criteo holds; `linked` maps a segment id to the key syncd links to it."""
    if not found:
        return "no contact-list segments found"
    rows = [
        [
            s.id,
            s.name,
            s.identifier_type or "any",
            "yes" if s.read_only else "no",
            linked.get(s.id, ""),
        ]
        for s in found
    ]
    return report.table(["id", "name", "identifier type", "read-only", "linked key"], rows)


def statistics_table(readings: Sequence[Any]) -> str:
    if not readings:
        return "no linked segments"
    rows = []
    for r in readings:
        s = r.statistics
        if s is None:
            said = f"failed: {r.error}" if r.error else "not supported"
            rows.append([r.segment_key, r.api, r.criteo_segment_id, said, "", ""])
            continue
        rate = "" if s.match_rate is None else f"{s.match_rate:.1%}"
        rows.append([r.segment_key, r.api, r.criteo_segment_id, s.identifiers, s.matches, rate])
    headers = ["key", "api", "criteo id", "identifiers", "matches", "match rate"]
    return report.table(headers, rows)
