"""Contact-list amendments: where an add/remove request goes, its streamed body, its
answer; and the clear call that empties a list (the segment stays)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from syncd.criteo.client import BeforeSend, CriteoClient, error_code
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
    # The first error's (or warning's) code and detail, if any.
    error_code: str | None = None
    error_detail: str | None = None

    @property
    def refused(self) -> bool:
        """A 2xx that reports errors (or, as the docs allow, warnings) and no counts:
        nothing says the identifiers were taken, so it must not count as acknowledged."""
        return (
            self.nb_valid is None and self.nb_invalid is None and bool(self.errors or self.warnings)
        )


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


# What the audit can hold: an int4 count, a short sample, a contact list id of digits.
_MAX_COUNT = 2**31 - 1
_MAX_SAMPLE = 100


def parse_amendment(status: int, payload: dict[str, Any]) -> AmendmentResult:
    """Read both documented shapes: counts under data.attributes (docs) or under data (SDK).
    A field of the wrong kind (a sample that is not a list, a count that is no int4) reads
    as unknown rather than failing: the answer is still a 2xx."""
    data = payload.get("data")
    if isinstance(data, list):  # not documented for this call; read the first item if any
        data = data[0] if data else {}
    if not isinstance(data, dict):
        data = {}
    attributes = data.get("attributes")
    fields = attributes if isinstance(attributes, dict) else data
    code, detail = error_code(payload)
    return AmendmentResult(
        http_status=status,
        nb_valid=_count(fields.get("nbValidIdentifiers")),
        nb_invalid=_count(fields.get("nbInvalidIdentifiers")),
        sample_invalid=_sample(fields.get("sampleInvalidIdentifiers")),
        request_date=_parse_date(fields.get("requestDate")),
        contact_list_id=_contact_list_id(fields.get("contactListId")),
        warnings=_items(payload.get("warnings")),
        errors=_items(payload.get("errors")),
        error_code=code,
        error_detail=detail,
    )


def _count(value: Any) -> int | None:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 12:
        value = int(value)
    if isinstance(value, float) and value.is_integer():  # 3.0; never NaN nor infinite
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= _MAX_COUNT else None


def _sample(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [str(x)[:256] for x in value[:_MAX_SAMPLE] if isinstance(x, str | int | float)]


def _contact_list_id(value: Any) -> str | None:
    # json keeps big integers exact; stored as text so nothing rounds it through a float.
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        return None
    return text if 0 < len(text) <= 64 else None


def _items(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _parse_date(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        # In UTC, or not at all: 0001-01-01T00:00+05:00 is before any timestamptz.
        return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        return None


def amendment_path(target: Target) -> str:
    if target.api == MARKETING_SOLUTIONS:
        return f"marketing-solutions/audience-segments/{target.segment_id}/contact-list"
    return f"retail-media/audience-segments/{target.segment_id}/contact-list/add-remove"


async def amend(
    client: CriteoClient,
    target: Target,
    body: AmendmentBody,
    idempotency_key: str,
    before_send: BeforeSend | None = None,
) -> AmendmentResult:
    """Send one add or remove request (see amendment_body) and read Criteo's answer.
    `before_send` runs right before each sending (see CriteoClient.call)."""
    method = "PATCH" if target.api == MARKETING_SOLUTIONS else "POST"
    answer = await client.call(
        method,
        amendment_path(target),
        body.pieces,
        body.size,
        idempotency_key=idempotency_key,
        before_send=before_send,
    )
    if not isinstance(answer.payload, dict):
        # Criteo probably applied it; sending again is harmless (add/remove are set
        # operations), not knowing is not.
        raise RetryableError(
            "Criteo's answer could not be read", status=answer.status, code="unreadable"
        )
    return parse_amendment(answer.status, answer.payload)


# A chunk's operation that empties the list instead of amending it (sql/0015_clear_chunks.sql).
CLEAR = "clear"


def clear_path(target: Target) -> str:
    if target.api == MARKETING_SOLUTIONS:
        return f"marketing-solutions/audience-segments/{target.segment_id}/contact-list"
    return f"retail-media/audience-segments/{target.segment_id}/contact-list/clear"


async def _no_body() -> AsyncIterator[bytes]:
    yield b""


async def clear_list(
    client: CriteoClient,
    target: Target,
    idempotency_key: str,
    before_send: BeforeSend | None = None,
) -> AmendmentResult:
    """Remove every identifier from the target's list: Retail Media POST .../clear (204 in
    the spec, 201 in the docs, 200 with a body in older docs), Marketing Solutions DELETE
    .../contact-list (200 with the segment). Any 2xx is success; one carrying errors (or
    warnings) says it was not done (`refused`). No counts: the audit keeps them NULL."""
    method = "DELETE" if target.api == MARKETING_SOLUTIONS else "POST"
    answer = await client.call(
        method,
        clear_path(target),
        _no_body,
        0,
        idempotency_key=idempotency_key,
        before_send=before_send,
    )
    payload = answer.payload if isinstance(answer.payload, dict) else {}
    code, detail = error_code(payload)
    return AmendmentResult(
        http_status=answer.status,
        nb_valid=None,
        nb_invalid=None,
        warnings=_items(payload.get("warnings")),
        errors=_items(payload.get("errors")),
        error_code=code,
        error_detail=detail,
    )


async def send_chunk(
    client: CriteoClient,
    target: Target,
    operation: str,
    body: AmendmentBody,
    idempotency_key: str,
    before_send: BeforeSend | None = None,
) -> AmendmentResult:
    """Send one chunk's request: a clear, or an add/remove with `body` (a clear has none)."""
    if operation == CLEAR:
        return await clear_list(client, target, idempotency_key, before_send)
    return await amend(client, target, body, idempotency_key, before_send)
