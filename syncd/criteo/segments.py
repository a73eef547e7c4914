"""Segment management over Criteo's API: create, search, rename, delete, statistics.

Create, update and delete are bulk calls with partial approval: a 200 lists what went
through in `data` and each refused item as a problem in `errors` or `warnings` (Retail
Media tends to use warnings, Marketing Solutions errors; both are read), pointing at the
item with `instance: "@data/N"`. syncd sends one item per call, so any problem means the
item was refused and nothing of it may be recorded locally.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from syncd.criteo.client import Answer, CriteoClient
from syncd.errors import PermanentError, RetryableError
from syncd.identifiers import RETAIL_MEDIA, wire_name

T = TypeVar("T")
# Criteo's largest page per API: Retail Media 500, Marketing Solutions 100.
PAGE_SIZE = {RETAIL_MEDIA: 500, "marketing-solutions": 100}
STATISTICS_NOT_SUPPORTED = "contact-list-statistics-not-supported"
ATTEMPTS = 4  # management calls are few and a person waits: a short, bounded retry
RETRY_WAIT_S = 2.0


@dataclass(frozen=True)
class Problem:
    """One refused item: Criteo's code and detail."""

    code: str
    detail: str

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code


class Refused(PermanentError):
    """Criteo answered 200 but refused the item (partial approval)."""

    def __init__(self, what: str, problems: list[Problem]) -> None:
        super().__init__(f"Criteo refused {what}: " + "; ".join(map(str, problems)))
        self.problems = problems


@dataclass(frozen=True)
class RemoteSegment:
    """A segment as Criteo's search or create answers it."""

    id: str
    name: str
    description: str | None
    identifier_type: str | None
    read_only: bool
    kind: str

    @classmethod
    def from_entity(cls, entity: Any) -> RemoteSegment:
        attrs = entity.get("attributes") if isinstance(entity, dict) else None
        attrs = attrs if isinstance(attrs, dict) else {}
        contact = attrs.get("contactList")
        contact = contact if isinstance(contact, dict) else {}
        description = attrs.get("description")
        if isinstance(description, dict):  # a NillableString: {"value": ...}
            description = description.get("value")
        return cls(
            id=str(entity.get("id")) if isinstance(entity, dict) else "?",
            name=str(attrs.get("name") or ""),
            description=description if isinstance(description, str) else None,
            identifier_type=contact.get("identifierType"),
            read_only=contact.get("isReadOnly") is True,
            kind=str(attrs.get("type") or "ContactList"),
        )


@dataclass(frozen=True)
class Statistics:
    identifiers: int | None
    matches: int | None
    match_rate: float | None


def problems(payload: Any) -> list[Problem]:
    """Every problem a 200 carries, from `errors` and `warnings` alike."""
    found: list[Problem] = []
    body = payload if isinstance(payload, dict) else {}
    for key in ("errors", "warnings"):
        entries = body.get(key)
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict):
                code = str(entry.get("code") or entry.get("type") or "unknown")
                detail = str(entry.get("detail") or entry.get("title") or "")
                found.append(Problem(code, detail))
    return found


async def _json_call(client: CriteoClient, method: str, path: str, payload: Any) -> Answer:
    """One JSON call, retried a few times on faults and 429 (a person is waiting)."""
    raw = b"" if payload is None else json.dumps(payload).encode()

    async def body() -> AsyncIterator[bytes]:
        yield raw

    for attempt in range(1, ATTEMPTS + 1):
        # Each call is reserved from the app's budget, shared with every process's pushes.
        await asyncio.sleep(await client.pacer.acquire())
        try:
            return await client.call(method, path, body, len(raw))
        except RetryableError as exc:
            if attempt == ATTEMPTS:
                raise
            await asyncio.sleep(min(exc.retry_after_s or RETRY_WAIT_S * attempt, 30.0))
    raise AssertionError("unreachable")


def _segments_path(api: str, account_id: str | None) -> str:
    if api == RETAIL_MEDIA:
        return f"retail-media/accounts/{account_id}/audience-segments"
    return "marketing-solutions/audience-segments"


def _one_item(what: str, answer: Answer) -> Any:
    refused = problems(answer.payload)
    data = answer.payload.get("data") if isinstance(answer.payload, dict) else None
    if refused or not isinstance(data, list) or len(data) != 1:
        raise Refused(what, refused or [Problem("no-result", "the answer names no segment")])
    return data[0]


async def create(
    client: CriteoClient,
    api: str,
    *,
    name: str,
    description: str | None,
    identifier_type: str,
    account_id: str,
    retailer_id: str | None = None,
) -> RemoteSegment:
    """Create one contact-list segment; Refused when Criteo says no."""
    attrs: dict[str, Any] = {"name": name}
    if description is not None:
        attrs["description"] = description
    if api == RETAIL_MEDIA:
        attrs["retailerId"] = retailer_id
        attrs["contactList"] = {"identifierType": wire_name(identifier_type, api)}
    else:
        attrs["advertiserId"] = account_id
        attrs["contactList"] = {}
    body = {"data": [{"type": "AudienceSegment", "attributes": attrs}]}
    answer = await _json_call(client, "POST", f"{_segments_path(api, account_id)}/create", body)
    return RemoteSegment.from_entity(_one_item(f"the segment {name!r}", answer))


async def rename(
    client: CriteoClient,
    api: str,
    account_id: str | None,
    segment_id: str,
    name: str,
    description: str | None,
) -> RemoteSegment:
    attrs: dict[str, Any] = {"name": name}
    if description is not None:
        attrs["description"] = {"value": description} if api == RETAIL_MEDIA else description
    body = {"data": [{"id": segment_id, "type": "AudienceSegment", "attributes": attrs}]}
    answer = await _json_call(client, "PATCH", _segments_path(api, account_id), body)
    return RemoteSegment.from_entity(_one_item(f"renaming segment {segment_id}", answer))


async def delete(client: CriteoClient, api: str, account_id: str | None, segment_id: str) -> None:
    body = {"data": [{"id": segment_id, "type": "AudienceSegment"}]}
    path = f"{_segments_path(api, account_id)}/delete"
    _one_item(f"deleting segment {segment_id}", await _json_call(client, "POST", path, body))


async def search(
    client: CriteoClient, api: str, account_id: str, name: str | None = None
) -> list[RemoteSegment]:
    """Every contact-list segment of an account (Retail Media) or advertiser (Marketing
    Solutions), all pages; `name` keeps those whose name holds it (case-insensitive)."""
    attrs: dict[str, Any] = {"audienceSegmentTypes": ["ContactList"]}
    if api != RETAIL_MEDIA:
        attrs["advertiserIds"] = [account_id]
    body = {"data": {"type": "AudienceSegment", "attributes": attrs}}
    limit, offset = PAGE_SIZE[api], 0
    found: list[RemoteSegment] = []
    while True:
        path = f"{_segments_path(api, account_id)}/search?offset={offset}&limit={limit}"
        payload = (await _json_call(client, "POST", path, body)).payload
        page = payload.get("data") if isinstance(payload, dict) else None
        page = page if isinstance(page, list) else []
        found.extend(RemoteSegment.from_entity(e) for e in page)
        meta = payload.get("meta") if isinstance(payload, dict) else None
        total = meta.get("totalItems") if isinstance(meta, dict) else None
        offset += len(page)
        if not page or not isinstance(total, int) or offset >= total:
            break
    wanted = name.casefold() if name else None
    return [s for s in found if wanted is None or wanted in s.name.casefold()]


async def statistics(
    client: CriteoClient, api: str, account_id: str | None, segment_id: str
) -> Statistics | None:
    """The contact list's statistics; None when Criteo does not compute them for it."""
    if api == RETAIL_MEDIA:
        path = f"retail-media/accounts/{account_id}/audience-segments/{segment_id}/contact-list"
    else:
        path = f"marketing-solutions/audience-segments/{segment_id}/contact-list/statistics"
    try:
        answer = await _json_call(client, "GET", path, None)
    except PermanentError as exc:
        if exc.code == STATISTICS_NOT_SUPPORTED:
            return None
        raise
    data = answer.payload.get("data") if isinstance(answer.payload, dict) else None
    attrs = data.get("attributes") if isinstance(data, dict) else None
    attrs = attrs if isinstance(attrs, dict) else {}
    return Statistics(
        identifiers=_number(attrs.get("numberOfIdentifiers"), int),
        matches=_number(attrs.get("numberOfMatches"), int),
        match_rate=_number(attrs.get("matchRate"), float),
    )


def _number(value: Any, kind: Callable[[Any], T]) -> T | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return kind(value)


__all__ = [
    "Problem",
    "Refused",
    "RemoteSegment",
    "Statistics",
    "create",
    "delete",
    "problems",
    "rename",
    "search",
    "statistics",
]
