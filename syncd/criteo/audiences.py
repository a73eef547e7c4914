"""Contact-list amendments: where an add/remove request goes, its streamed body, its answer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from syncd.criteo.client import CriteoClient
from syncd.errors import RetryableError
from syncd.identifiers import MARKETING_SOLUTIONS, wire_name


@dataclass(frozen=True)
class Target:
    """Where a chunk goes: a linked Criteo segment."""

    api: str
    segment_id: str
    identifier_type: str
    account_id: str | None = None
    gum_caller_id: int | None = None


@dataclass(frozen=True)
class AmendmentResult:
    """Criteo's answer to one add/remove request."""

    http_status: int
    nb_valid: int | None
    nb_invalid: int | None
    sample_invalid: list[str] = field(default_factory=list)
    request_date: datetime | None = None
    contact_list_id: str | None = None
    warnings: list[Any] = field(default_factory=list)
    errors: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class AmendmentBody:
    """One add/remove request body, streamed: a JSON envelope around the identifiers'
    JSON array, whose bytes `identifiers()` yields in pieces, afresh for every attempt.

    The size is known up front (Content-Length), so the request is a plain one, not
    chunked, and the process never holds more than a piece of it.
    """

    head: bytes
    identifiers_bytes: int
    identifiers: Callable[[], AsyncIterator[bytes]]
    tail: bytes = b"}}}"

    @property
    def size(self) -> int:
        return len(self.head) + self.identifiers_bytes + len(self.tail)

    async def pieces(self) -> AsyncIterator[bytes]:
        yield self.head
        sent = 0
        async for piece in self.identifiers():
            sent += len(piece)
            yield piece
        if sent != self.identifiers_bytes:
            # The payload went away (another run finished the chunk): abort the request.
            raise RetryableError(
                f"the chunk's payload changed while it was sent ({sent} of "
                f"{self.identifiers_bytes} bytes)",
                code="payload_changed",
            )
        yield self.tail


def amendment_body(
    target: Target,
    operation: str,
    identifiers_bytes: int,
    identifiers: Callable[[], AsyncIterator[bytes]],
) -> AmendmentBody:
    """The request body around identifiers that arrive as UTF-8 JSON array bytes (as
    PostgreSQL encoded them at plan time): they never become Python strings."""
    attributes: dict[str, Any] = {
        "operation": operation,
        "identifierType": wire_name(target.identifier_type, target.api),
    }
    if target.gum_caller_id is not None and target.identifier_type == "gum":
        attributes["gumCallerId"] = target.gum_caller_id
    kind = "ContactlistAmendment" if target.api == MARKETING_SOLUTIONS else "AddRemoveContactlist"
    head = json.dumps({"data": {"type": kind, "attributes": attributes}})
    assert head.endswith("}}}")
    return AmendmentBody(
        head=head[:-3].encode() + b', "identifiers": ',
        identifiers_bytes=identifiers_bytes,
        identifiers=identifiers,
    )


def parse_amendment(status: int, payload: dict[str, Any]) -> AmendmentResult:
    """Read both documented shapes: counts under data.attributes (docs) or under data (SDK)."""
    data = payload.get("data")
    if isinstance(data, list):  # not documented for this call; read the first item if any
        data = data[0] if data else {}
    if not isinstance(data, dict):
        data = {}
    attributes = data.get("attributes")
    fields = attributes if isinstance(attributes, dict) else data
    contact_list_id = fields.get("contactListId")
    return AmendmentResult(
        http_status=status,
        nb_valid=_int_or_none(fields.get("nbValidIdentifiers")),
        nb_invalid=_int_or_none(fields.get("nbInvalidIdentifiers")),
        sample_invalid=[str(x) for x in fields.get("sampleInvalidIdentifiers") or []],
        request_date=_parse_date(fields.get("requestDate")),
        # json keeps big integers exact; store as text so nothing rounds it through a float.
        contact_list_id=None if contact_list_id is None else str(contact_list_id),
        warnings=list(payload.get("warnings") or []),
        errors=list(payload.get("errors") or []),
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _parse_date(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def amendment_path(target: Target) -> str:
    if target.api == MARKETING_SOLUTIONS:
        return f"marketing-solutions/audience-segments/{target.segment_id}/contact-list"
    return f"retail-media/audience-segments/{target.segment_id}/contact-list/add-remove"


async def amend(
    client: CriteoClient, target: Target, body: AmendmentBody, idempotency_key: str
) -> AmendmentResult:
    """Send one add or remove request (see amendment_body) and read Criteo's answer."""
    method = "PATCH" if target.api == MARKETING_SOLUTIONS else "POST"
    answer = await client.call(
        method, amendment_path(target), body.pieces, body.size, idempotency_key=idempotency_key
    )
    if not isinstance(answer.payload, dict):
        # Criteo probably applied it; sending again is harmless (add/remove are set
        # operations), not knowing is not.
        raise RetryableError("Criteo's answer could not be read", status=answer.status)
    return parse_amendment(answer.status, answer.payload)
