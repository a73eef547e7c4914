"""The Criteo contract the sandbox enforces: what a request must hold, what it gets back.

Amendment validation, which identifiers Criteo takes as valid for each type, applying
an amendment to a segment's members, and the answer bodies of the amendment, clear,
statistics and search calls, each in its API's documented shape (create, update and
delete: ``syncd.sandbox.management``). The handlers in
``syncd.sandbox.app`` do the plumbing around these: versions, auth, faults, the request log.

These rules stand for Criteo's, so they must not share syncd's idea of what a valid
identifier is: a bug there would otherwise pass unnoticed on both sides.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from syncd.sandbox.config import MARKETING_SOLUTIONS, MS_TYPES, RETAIL_MEDIA, RM_TYPES
from syncd.sandbox.errors import error_response, problem
from syncd.sandbox.state import SandboxState, Segment, now_iso

MAX_IDENTIFIERS = 50_000
_AMEND_TYPES = {
    RETAIL_MEDIA: ("AddRemoveContactlist", "ContactlistAmendment"),
    MARKETING_SOLUTIONS: ("ContactlistAmendment",),
}
_SEARCH_MAX_LIMIT = {RETAIL_MEDIA: 500, MARKETING_SOLUTIONS: 100}

_HEX64 = r"[0-9a-f]{64}"
_VALIDATORS: dict[str, Callable[[str], object]] = {
    "email": re.compile(rf"{_HEX64}|[0-9a-f]{{32}}|[^@\s]+@[^@\s]+\.[^@\s]+").fullmatch,
    "phonenumber": re.compile(rf"{_HEX64}|\+[0-9](?:[ -]?[0-9]){{7,14}}").fullmatch,
    "madid": re.compile(
        rf"{_HEX64}|[0-9a-fA-F]{{8}}-(?:[0-9a-fA-F]{{4}}-){{3}}[0-9a-fA-F]{{12}}"
    ).fullmatch,
}


def _no_space(value: str) -> bool:
    return value.split() == [value]


# --- error answers and request bodies ------------------------------------------------


def validation_error(code: str, detail: str, instance: str = "@data") -> web.Response:
    return error_response(400, problem("validation", code, detail, instance))


def segment_not_found(segment_id: str) -> web.Response:
    return error_response(
        404,
        problem("validation", "segment-not-found", f"segment {segment_id} was not found", "@id"),
    )


async def json_body(request: web.Request) -> tuple[Any, web.Response | None]:
    """The parsed body, or an error answer. An empty body reads as None."""
    raw = await request.read()
    if not raw.strip():
        return None, None
    try:
        return json.loads(raw), None
    except (ValueError, UnicodeDecodeError):
        return None, validation_error("invalid-json", "the request body is not valid JSON", "@")


# --- contact-list amendments -----------------------------------------------------------


@dataclass(frozen=True)
class Amendment:
    operation: str
    identifier_type: str  # as sent
    type_key: str  # lower case
    identifiers: list[str]


def describe(body: Any, entry: dict[str, Any]) -> None:
    """Fill a log entry from whatever a body holds, before it is validated."""
    data = body.get("data") if isinstance(body, dict) else None
    attrs = data.get("attributes") if isinstance(data, dict) else None
    if not isinstance(attrs, dict):
        return
    for key, name in (("operation", "operation"), ("identifierType", "identifier_type")):
        if isinstance(attrs.get(key), str):
            entry[name] = attrs[key]
    if isinstance(attrs.get("identifiers"), list):
        entry["count"] = len(attrs["identifiers"])
    if "gumCallerId" in attrs:
        entry["gum_caller_id"] = attrs["gumCallerId"]


def validate_amendment(body: Any, api: str, segment: Segment) -> Amendment | web.Response:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        return validation_error("required-field-missing", "data must be an object", "@data")
    # The Retail Media SDK schema makes data.type optional, so only a wrong one is refused.
    if data.get("type", _AMEND_TYPES[api][0]) not in _AMEND_TYPES[api]:
        allowed = " or ".join(_AMEND_TYPES[api])
        return validation_error("invalid-type", f"data.type must be {allowed}", "@data/type")
    attrs = data.get("attributes")
    if not isinstance(attrs, dict):
        return validation_error(
            "required-field-missing", "attributes are required", "@data/attributes"
        )
    operation = attrs.get("operation")
    if operation not in ("add", "remove"):
        return validation_error(
            "invalid-operation", "operation must be add or remove", "@data/attributes/operation"
        )
    id_type = attrs.get("identifierType")
    where = "@data/attributes/identifierType"
    types = RM_TYPES if api == RETAIL_MEDIA else MS_TYPES
    if not isinstance(id_type, str) or id_type.lower() not in types:
        detail = f"identifierType must be one of {', '.join(types.values())}"
        if isinstance(id_type, str) and id_type.lower() == "gum":
            detail = "Gum identifiers are not supported on Retail Media"
        return validation_error("invalid-identifier-type", detail, where)
    key = id_type.lower()
    if key == "gum":
        caller = attrs.get("gumCallerId")
        if isinstance(caller, bool) or not isinstance(caller, int):
            return validation_error(
                "gum-caller-id-required",
                "gumCallerId (an integer) is required for gum identifiers",
                "@data/attributes/gumCallerId",
            )
    identifiers = attrs.get("identifiers")
    where = "@data/attributes/identifiers"
    if not isinstance(identifiers, list):
        return validation_error("invalid-identifiers-format", "identifiers must be a list", where)
    if len(identifiers) > MAX_IDENTIFIERS:
        return validation_error(
            "too-many-identifiers",
            f"at most {MAX_IDENTIFIERS} identifiers per request, got {len(identifiers)}",
            where,
        )
    if not set(map(type, identifiers)) <= {str}:  # map: a C loop, not a Python one
        index = next(i for i, value in enumerate(identifiers) if not isinstance(value, str))
        detail = "identifiers must be strings"
        return validation_error("invalid-identifiers-format", detail, f"{where}/{index}")
    if segment.identifier_type is not None and segment.identifier_type.lower() != key:
        return validation_error(
            "identifier-type-mismatch",
            f"the segment holds {segment.identifier_type} identifiers, not {id_type}",
            "@data/attributes/identifierType",
        )
    return Amendment(operation, id_type, key, identifiers)


def _all_sha256(identifiers: list[str]) -> bool:
    """Whether every identifier is 64 lower-case hex digits, checked on the whole batch.

    SHA-256 hashes are what syncd sends and valid for every type; one pass over the
    joined text in C is several times faster than a regular expression per identifier.
    """
    if set(map(len, identifiers)) != {64}:
        return False
    joined = "".join(identifiers).encode("ascii", "replace")
    return not joined.translate(None, b"0123456789abcdef")


def _split_valid(type_key: str, identifiers: list[str]) -> tuple[list[str], list[str]]:
    """The valid identifiers for the type, and the invalid ones, in request order."""
    if _all_sha256(identifiers):
        return identifiers, []
    matches = _VALIDATORS.get(type_key)
    if matches is None:  # any non-empty text without white space
        if all(identifiers) and len("".join(identifiers).split()) == 1:
            return identifiers, []
        matches = _no_space
    valid: list[str] = []
    invalid: list[str] = []
    for value in identifiers:
        (valid if matches(value) else invalid).append(value)
    return valid, invalid


def apply_amendment(
    state: SandboxState, segment: Segment, change: Amendment
) -> tuple[int, list[str]]:
    """Apply the valid identifiers; the number applied and the invalid ones."""
    valid, invalid = _split_valid(change.type_key, change.identifiers)
    if state.config.keep_members:
        if change.operation == "add":
            segment.members.update(valid)
        else:
            segment.members.difference_update(valid)
    else:
        # Without the sets there is no telling repeats apart: the size is a running count.
        delta = len(valid) if change.operation == "add" else -len(valid)
        segment.counted = max(0, segment.counted + delta)
    state.amendments_applied += 1
    return len(valid), invalid


def amendment_answer(
    state: SandboxState, segment: Segment, change: Amendment, *, n_valid: int, invalid: list[str]
) -> web.Response:
    api = segment.api
    result: dict[str, Any] = {
        # An integer for both APIs: both SDK schemas say int64 (the MS docs show a string).
        "contactListId": segment.contact_list_id,
        "operation": change.operation,
        "requestDate": now_iso(),
        "identifierType": change.identifier_type,
        "nbValidIdentifiers": n_valid,
        "nbInvalidIdentifiers": len(invalid),
        "sampleInvalidIdentifiers": invalid[:5],
    }
    warnings = []
    if invalid:
        warnings.append(
            problem(
                "validation",
                "invalid-identifiers",
                f"{len(invalid)} identifiers were invalid",
                "@data/attributes/identifiers",
            )
        )
    data: dict[str, Any]
    if api == MARKETING_SOLUTIONS:
        data = {"type": "ContactlistAmendment", "attributes": result}
    elif state.next_shape() == "docs":
        data = {"type": "AddRemoveContactlistResult", "attributes": result}
    else:
        data = result
    return web.json_response({"data": data, "errors": [], "warnings": warnings})


# --- clear and statistics ----------------------------------------------------------------


def cleared_answer(segment: Segment) -> web.Response:
    """The answer to a clear call, once the segment has been emptied."""
    if segment.api == RETAIL_MEDIA:
        return web.Response(status=204)
    data = {"type": "ContactListAudienceSegment", "id": segment.id}
    return web.json_response({"data": data, "errors": [], "warnings": []})


def statistics_answer(segment: Segment, keep_members: bool) -> web.Response:
    if not segment.statistics_supported:
        detail = f"no contact-list statistics for segment {segment.id}"
        return validation_error("contact-list-statistics-not-supported", detail, "@id")
    size = segment.size(keep_members)
    # Half the identifiers match: a fixed rate, so tests can predict the figures.
    rate = 0.5 if size else 0.0
    attrs = {"numberOfIdentifiers": size, "numberOfMatches": round(size * rate), "matchRate": rate}
    data = {"id": segment.id, "type": "ContactlistStatistics", "attributes": attrs}
    return web.json_response({"data": data, "errors": [], "warnings": []})


# --- search (create, update and delete: syncd.sandbox.management) ----------------------


def paging(query: Mapping[str, str], api: str) -> tuple[int, int] | web.Response:
    """The offset and limit of a search, or the answer refusing them."""
    try:
        offset = int(query.get("offset", "0"))
        limit = int(query.get("limit", "50"))
    except ValueError:
        return validation_error("invalid-paging", "offset and limit must be integers", "@query")
    top = _SEARCH_MAX_LIMIT[api]
    if offset < 0 or not 1 <= limit <= top:
        return validation_error("invalid-paging", f"offset >= 0 and 1 <= limit <= {top}", "@query")
    return offset, limit


def _filter(value: Any) -> set[str] | None:
    return None if not isinstance(value, list) else {str(v).lower() for v in value}


def search_answer(
    state: SandboxState, api: str, account: str | None, body: Any, offset: int, limit: int
) -> web.Response:
    """One page of the segments a search body selects; ``account`` is the path's, if any."""
    data = body.get("data") if isinstance(body, dict) else None
    attrs = data.get("attributes") if isinstance(data, dict) else None
    attrs = attrs if isinstance(attrs, dict) else {}
    ids = _filter(attrs.get("audienceSegmentIds"))
    types = _filter(attrs.get("audienceSegmentTypes"))
    retailers = _filter(attrs.get("retailerIds"))
    advertisers = _filter(attrs.get("advertiserIds"))
    found = [
        s
        for s in state.segments.values()
        if s.api == api
        and (account is None or s.account_id == account)
        and (ids is None or s.id in ids)
        and (types is None or "contactlist" in types)
        and (retailers is None or str(s.retailer_id).lower() in retailers)
        and (advertisers is None or s.account_id.lower() in advertisers)
    ]
    page = [s.entity() for s in found[offset : offset + limit]]
    meta = {"totalItems": len(found), "limit": limit, "offset": offset}
    return web.json_response({"data": page, "meta": meta, "errors": [], "warnings": []})
