"""Segment links: which Criteo contact-list segment each CRM segment key feeds
(what `syncd segments link / unlink / list` manage)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from syncd import mirror
from syncd.config import DEFAULT_APP
from syncd.db import query
from syncd.errors import UsageError
from syncd.identifiers import APIS, MARKETING_SOLUTIONS, SEND_AS, WHITESPACE, parse_type

# Criteo's gumCallerId is a 32-bit integer; an advertiser's caller id is positive.
GUM_CALLER_ID_MAX = 2**31 - 1

_APP_NAME = re.compile(r"[a-z0-9_]+")

LinkAction = Literal["linked", "updated", "unchanged"]


@dataclass(frozen=True)
class Link:
    segment_key: str
    criteo_segment_id: str
    identifier_type: str
    api: str = "retail-media"
    send_as: str = "sha256"
    account_id: str | None = None
    gum_caller_id: int | None = None
    app: str = DEFAULT_APP  # the Criteo app whose credentials and budget push its chunks
    # A mirror link's source relation (mirror.py); None: the link reads the inbox.
    mirror: str | None = None


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
    # isascii: str.isdigit alone takes '١٢٣' and '²', which Criteo's ids never contain.
    if not (link.criteo_segment_id.isascii() and link.criteo_segment_id.isdigit()):
        raise UsageError(
            f"--segment-id must be Criteo's numeric segment id, not {link.criteo_segment_id!r}"
        )
    if not _APP_NAME.fullmatch(link.app):
        raise UsageError(
            f"--app {link.app!r} is not an app name (lower-case letters, digits, underscores)"
        )
    if link.send_as not in SEND_AS:
        raise UsageError(f"--send-as must be one of {', '.join(SEND_AS)}")
    kind = parse_type(link.identifier_type, link.api)
    if kind.name == "gum" and link.gum_caller_id is None:
        raise UsageError("identifier type gum needs --gum-caller-id (Criteo requires it)")
    if link.gum_caller_id is not None and link.api != MARKETING_SOLUTIONS:
        raise UsageError("--gum-caller-id only applies to the marketing-solutions API")
    if link.gum_caller_id is not None and not 1 <= link.gum_caller_id <= GUM_CALLER_ID_MAX:
        raise UsageError(
            f"--gum-caller-id must be a positive 32-bit integer (1 to {GUM_CALLER_ID_MAX}), "
            f"as Criteo takes it; not {link.gum_caller_id}"
        )
    return replace(link, segment_key=key, identifier_type=kind.name)


@dataclass(frozen=True)
class LinkOutcome:
    """What `link` did. Open chunks keep the target they were planned for (each chunk
    records its own), so a forced re-point redirects only changes planned afterwards."""

    action: LinkAction
    link: Link
    open_chunks: int = 0
    open_targets: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        target = f"{self.link.api} segment {self.link.criteo_segment_id}"
        if self.link.app != DEFAULT_APP:
            target += f" (app {self.link.app})"
        if self.link.mirror is not None:
            target += f", mirroring {self.link.mirror}"
        if self.action == "unchanged":
            return f"{self.link.segment_key} already links to {target}"
        said = f"{self.action} {self.link.segment_key} -> {target}"
        if self.action == "updated" and self.open_chunks:
            said += (
                f"; its {self.open_chunks} open chunk(s) still go to "
                f"{' and '.join(self.open_targets)}, the target they were planned for "
                "(changes planned from now on go to the new target)"
            )
        return said


async def link(conn: Any, wanted: Link, *, force: bool = False) -> LinkOutcome:
    """Create or re-point a link. Re-pointing a key whose chunks are not all acknowledged
    is refused unless forced; forced, those chunks still go where they were planned for."""
    new = validate(wanted)
    if new.mirror is not None:
        new = replace(new, mirror=await mirror.resolve_relation(conn, new.mirror))
    args = (
        new.segment_key,
        new.api,
        new.criteo_segment_id,
        new.identifier_type,
        new.send_as,
        new.account_id,
        new.gum_caller_id,
        new.app,
        new.mirror,
    )
    async with conn.transaction():
        # Locked first: a plan of this key in progress finishes, and its chunks count.
        current = await conn.fetchrow(query("get_segment_for_update"), new.segment_key)
        targets = await conn.fetch(query("open_chunk_targets"), new.segment_key)
        _refuse_untargeted(new.segment_key, targets)
        open_chunks = sum(r["chunks"] for r in targets)
        if current is None:
            await conn.execute(query("insert_segment"), *args)
            return LinkOutcome("linked", new)
        if (current["identifier_type"], current["send_as"]) != (new.identifier_type, new.send_as):
            # Planned chunks hold values normalised for the old type: a new link, not a
            # re-point, even forced.
            raise UsageError(
                f"{new.segment_key!r} is linked with identifier type {current['identifier_type']} "
                f"(sent as {current['send_as']}); a different type or hashing needs "
                f"`syncd segments unlink {new.segment_key}` first"
            )
        described = tuple(_describe(r) for r in targets)
        wanted_target = (
            new.api,
            new.criteo_segment_id,
            new.account_id,
            new.gum_caller_id,
            new.app,
        )
        if (*_target_of(current), current["mirror_relation"]) == (*wanted_target, new.mirror):
            return LinkOutcome("unchanged", new, open_chunks, described)
        # Turning a link into a mirror (or back) with the same target moves no chunk.
        if open_chunks and not force and _target_of(current) != wanted_target:
            raise UsageError(
                f"{new.segment_key!r} has {open_chunks} chunk(s) not yet acknowledged, planned "
                f"for {' and '.join(described)}; re-pointing does not move them. Run "
                "`syncd sync` first, or re-point with --force: they still go to the target "
                "they were planned for, and only changes planned afterwards go to "
                f"{new.api} segment {new.criteo_segment_id}"
            )
        await conn.execute(query("update_segment"), *args)
        return LinkOutcome("updated", new, open_chunks, described)


def _target_of(row: Any) -> tuple[Any, ...]:
    return (
        row["api"],
        row["criteo_segment_id"],
        row["account_id"],
        row["gum_caller_id"],
        row["app"],
    )


def _describe(target: Any) -> str:
    said = f"{target['api']} segment {target['criteo_segment_id']}"
    if target["account_id"] is not None:
        said += f" (account {target['account_id']})"
    if target["gum_caller_id"] is not None:
        said += f" (gumCallerId {target['gum_caller_id']})"
    if target["app"] not in (None, DEFAULT_APP):
        said += f" (app {target['app']})"
    return said


def _refuse_untargeted(segment_key: str, targets: Sequence[Any]) -> None:
    """Chunks with no target can never be sent, and the key's new chunks would wait
    behind them for ever (plans of one key go in order)."""
    stuck = sum(r["chunks"] for r in targets if r["api"] is None)
    if stuck:
        raise UsageError(
            f"{segment_key!r} has {stuck} chunk(s) planned before syncd recorded the "
            "target of each chunk, for a link since removed or changed: they can never be "
            f"sent. Drop them with `syncd segments unlink {segment_key} --force` first"
        )


async def unlink(conn: Any, segment_key: str, *, force: bool = False) -> int:
    """Remove a link; refuses while chunks are unsent unless forced (they are then
    dropped). Forced, it also drops the chunks of a key that is no longer linked."""
    async with conn.transaction():
        current = await conn.fetchrow(query("get_segment_for_update"), segment_key)
        targets = await conn.fetch(query("open_chunk_targets"), segment_key)
        open_chunks = sum(r["chunks"] for r in targets)
        if current is None and not open_chunks:
            raise UsageError(f"{segment_key!r} is not linked")
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
