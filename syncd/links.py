"""Segment links: which Criteo contact-list segment each CRM segment key feeds
(what `syncd segments link / unlink / list` manage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from syncd.db import query
from syncd.errors import UsageError
from syncd.identifiers import APIS, MARKETING_SOLUTIONS, SEND_AS, WHITESPACE, parse_type


@dataclass(frozen=True)
class Link:
    segment_key: str
    criteo_segment_id: str
    identifier_type: str
    api: str = "retail-media"
    send_as: str = "sha256"
    account_id: str | None = None
    gum_caller_id: int | None = None


def validate(link: Link) -> Link:
    """A link Criteo can serve, with the identifier type in its canonical spelling."""
    key = link.segment_key
    if not key.strip(WHITESPACE):
        raise UsageError("the segment key must not be empty")
    if key.strip(WHITESPACE) != key:
        # Keys are matched exactly as the inbox holds them: stripping here would link a key
        # that no inbox row carries, and the rows under the key as written would wait for ever.
        raise UsageError(
            f"the segment key {key!r} has leading or trailing whitespace; keys are matched "
            "exactly as the CRM writes them, so such a key cannot be linked: have the CRM "
            "write it without the whitespace"
        )
    if link.api not in APIS:
        raise UsageError(f"unknown API {link.api!r}; use one of {', '.join(APIS)}")
    if not link.criteo_segment_id.isdigit():
        raise UsageError(
            f"--segment-id must be Criteo's numeric segment id, not {link.criteo_segment_id!r}"
        )
    if link.send_as not in SEND_AS:
        raise UsageError(f"--send-as must be one of {', '.join(SEND_AS)}")
    kind = parse_type(link.identifier_type, link.api)
    if kind.name == "gum" and link.gum_caller_id is None:
        raise UsageError("identifier type gum needs --gum-caller-id (Criteo requires it)")
    if link.gum_caller_id is not None and link.api != MARKETING_SOLUTIONS:
        raise UsageError("--gum-caller-id only applies to the marketing-solutions API")
    return Link(
        segment_key=key,
        criteo_segment_id=link.criteo_segment_id,
        identifier_type=kind.name,
        api=link.api,
        send_as=link.send_as,
        account_id=link.account_id,
        gum_caller_id=link.gum_caller_id,
    )


async def link(conn: Any, wanted: Link) -> str:
    """Create or re-point a link; returns 'linked' or 'updated'."""
    new = validate(wanted)
    args = (
        new.segment_key,
        new.api,
        new.criteo_segment_id,
        new.identifier_type,
        new.send_as,
        new.account_id,
        new.gum_caller_id,
    )
    async with conn.transaction():
        current = await conn.fetchrow(query("get_segment_for_update"), new.segment_key)
        if current is None:
            await conn.execute(query("insert_segment"), *args)
            return "linked"
        if (current["identifier_type"], current["send_as"]) != (new.identifier_type, new.send_as):
            # Planned chunks hold values normalised for the old type: they would be wrong.
            raise UsageError(
                f"{new.segment_key!r} is linked with identifier type {current['identifier_type']} "
                f"(sent as {current['send_as']}); a different type or hashing needs "
                f"`syncd segments unlink {new.segment_key}` first"
            )
        await conn.execute(query("update_segment"), *args)
        return "updated"


async def unlink(conn: Any, segment_key: str, *, force: bool = False) -> int:
    """Remove a link; refuses while chunks are unsent unless forced (they are then dropped)."""
    async with conn.transaction():
        if await conn.fetchrow(query("get_segment"), segment_key) is None:
            raise UsageError(f"{segment_key!r} is not linked")
        open_chunks = await conn.fetchval(query("count_open_chunks"), segment_key)
        if open_chunks and not force:
            raise UsageError(
                f"{segment_key!r} has {open_chunks} chunk(s) not yet acknowledged by Criteo; "
                "run `syncd sync` first, or unlink with --force to drop them"
            )
        await conn.execute(query("discard_open_chunks"), segment_key)
        await conn.execute(query("delete_segment"), segment_key)
        return int(open_chunks)


async def list_links(conn: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(query("list_segments"))]
