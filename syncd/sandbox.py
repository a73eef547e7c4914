"""The sandbox: a Criteo-compatible audience API on loopback, for tests, the demo and the benchmark.

It serves the contact-list calls syncd makes (OAuth2 client credentials, add/remove,
clear, statistics, create and search, for Retail Media and Marketing Solutions), checks
requests the way Criteo does, and keeps real member sets so a test can check what a
segment ends up holding. Faults are injected on demand under ``/_sandbox/`` (no auth)
or at random from :class:`SandboxConfig`; see ``syncd.sandbox_faults``.

The sandbox is deliberately independent of the rest of syncd: it stands for Criteo, so
it must not share syncd's idea of what a valid identifier is.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import secrets
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import structlog
from aiohttp import web
from yarl import URL

from syncd.sandbox_faults import (
    SANDBOX_STATE,
    DroppedResponse,
    FaultInjector,
    RateLimiter,
    control_routes,
    error_response,
    problem,
    with_faults,
)

__all__ = [
    "SANDBOX_STATE",
    "RunningSandbox",
    "SandboxConfig",
    "SandboxState",
    "create_app",
    "run_sandbox",
    "start_sandbox",
]

log = structlog.get_logger(__name__)

RETAIL_MEDIA = "retail-media"
MARKETING_SOLUTIONS = "marketing-solutions"
SERVED_VERSIONS = frozenset({"2026-07", "2027-01", "preview"})
DEPRECATED_VERSIONS = {"2026-01": "Wed, 27 Jan 2027 00:00:00 GMT"}  # version -> Sunset
MAX_IDENTIFIERS = 50_000
LOG_SIZE = 10_000
_VERSION = re.compile(r"\d{4}-\d{2}")
_RM_CONTACT_LIST_BASE = 523103620165619700  # above 2**53, as Criteo's ids are
_RM_SEGMENT_BASE = 738406688413290496
_MS_SEGMENT_BASE = 1000
_MAX_BODY = 64 * 1024 * 1024  # 50,000 long identifiers are ~4 MB; aiohttp's default is 1 MiB

# Canonical spellings per API, keyed by lower case: the SDK enums (Retail Media) and the
# docs' enum (Marketing Solutions). Requests are matched case-insensitively.
RM_TYPES = {
    t.lower(): t for t in ("Email", "UserIdentifier", "IdentityLink", "CustomerId", "PhoneNumber")
}
MS_TYPES = {t.lower(): t for t in ("email", "madid", "identityLink", "gum", "phoneNumber")}
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


@dataclass(frozen=True)
class SandboxConfig:
    client_id: str = "sandbox-client"
    client_secret: str = "sandbox-secret"  # noqa: S105 - a fixture credential, not a secret
    token_ttl_s: int = 900
    latency_ms: float = 0.0  # added to every amendment/clear/stats request
    latency_jitter_ms: float = 0.0  # uniform extra 0..jitter
    # Retail Media add-remove answer: "docs" (counts under data.attributes), "sdk"
    # (counts directly under data), "alternate" (switch on every request).
    response_shape: str = "alternate"
    rate_limit_per_minute: int | None = None
    fault_rate_5xx: float = 0.0
    fault_rate_429: float = 0.0
    fault_rate_drop: float = 0.0  # apply the amendment, then drop the connection
    retry_after_s: float = 1.0
    seed: int | None = None
    keep_members: bool = True  # False: only count, to save memory in the benchmark

    def __post_init__(self) -> None:
        if self.response_shape not in ("docs", "sdk", "alternate"):
            raise ValueError("response_shape must be 'docs', 'sdk' or 'alternate'")


def _now_iso() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclass
class Segment:
    id: str
    api: str
    account_id: str  # Retail Media accountId, Marketing Solutions advertiserId
    identifier_type: str | None  # canonical spelling; None: any (Marketing Solutions)
    name: str
    description: str | None
    retailer_id: str | None
    contact_list_id: int
    created_at: str
    members: set[str] = field(default_factory=set)
    counted: int = 0  # the size when members are not kept

    def size(self, keep_members: bool) -> int:
        return len(self.members) if keep_members else self.counted

    def entity(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "type": "ContactList",
            "createdAt": self.created_at,
            "updatedAt": self.created_at,
        }
        if self.api == RETAIL_MEDIA:
            attrs |= {
                "accountId": self.account_id,
                "retailerId": self.retailer_id,
                "createdById": None,
                "channels": ["Offsite"],
                "contactList": {
                    "isReadOnly": False,
                    "identifierType": self.identifier_type,
                    "sharingStatus": "NotShared",
                },
            }
        else:
            attrs |= {"advertiserId": self.account_id, "contactList": {"isReadOnly": False}}
        return {"id": self.id, "type": "AudienceSegment", "attributes": attrs}


class SandboxState:
    """Everything the sandbox remembers: segments, members, tokens, counters, faults."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.faults = FaultInjector(config)
        self.rate_limiter = RateLimiter()
        self.tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.reset()

    def reset(self) -> None:
        """Forget segments, members, counters and faults; tokens stay valid."""
        self.segments: dict[str, Segment] = {}
        self.token_requests = 0
        self.requests: dict[str, Counter[str]] = {}
        self.amendments_applied = 0
        self.identifiers_received = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)
        self._serial = 0
        self._answers = 0  # Retail Media add-remove answers, for the alternating shape
        self.faults.reset()
        self.rate_limiter.reset()

    def add_segment(
        self,
        api: str,
        account_id: str,
        identifier_type: str | None,
        *,
        segment_id: str | None = None,
        name: str | None = None,
        description: str | None = None,
        retailer_id: str | None = None,
    ) -> Segment:
        self._serial += 1
        base = _RM_SEGMENT_BASE if api == RETAIL_MEDIA else _MS_SEGMENT_BASE
        sid = segment_id or str(base + self._serial)
        segment = Segment(
            id=sid,
            api=api,
            account_id=account_id,
            identifier_type=identifier_type,
            name=name or f"sandbox segment {sid}",
            description=description,
            retailer_id=retailer_id,
            contact_list_id=_RM_CONTACT_LIST_BASE + self._serial,
            created_at=_now_iso(),
        )
        self.segments[sid] = segment
        return segment

    def seed_segment(self, body: dict[str, Any]) -> Segment:
        """A segment from a /_sandbox/segments body; ValueError if malformed, KeyError if taken."""
        api = body.get("api")
        if api not in (RETAIL_MEDIA, MARKETING_SOLUTIONS):
            raise ValueError(f"api must be {RETAIL_MEDIA} or {MARKETING_SOLUTIONS}")
        raw = body.get("identifier_type")
        types = RM_TYPES if api == RETAIL_MEDIA else MS_TYPES
        identifier_type = types.get(raw.lower()) if isinstance(raw, str) else None
        if identifier_type is None and (raw is not None or api == RETAIL_MEDIA):
            raise ValueError(f"identifier_type must be one of {', '.join(types.values())}")
        segment_id = None if body.get("id") is None else str(body["id"])
        if segment_id is not None and segment_id in self.segments:
            raise KeyError(f"segment {segment_id} exists already")
        name, retailer = body.get("name"), body.get("retailer_id")
        return self.add_segment(
            api,
            str(body.get("account_id") or "1000"),
            identifier_type,
            segment_id=segment_id,
            name=name if isinstance(name, str) else None,
            retailer_id=None if retailer is None else str(retailer),
        )

    def next_shape(self) -> str:
        shape = self.config.response_shape
        if shape == "alternate":
            shape = "docs" if self._answers % 2 == 0 else "sdk"
        self._answers += 1
        return shape

    def issue_token(self) -> str:
        token = secrets.token_urlsafe(32)
        self.tokens[token] = time.monotonic() + self.config.token_ttl_s
        return token

    def check_token(self, header: str | None) -> str | None:
        """None when the Authorization header holds a live token, else the error code."""
        scheme, _, token = (header or "").partition(" ")
        expiry = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if expiry is None:
            return "authorization-token-invalid"
        if time.monotonic() >= expiry:
            return "authorization-token-expired"
        return None

    def expire_tokens(self) -> None:
        self.tokens = dict.fromkeys(self.tokens, 0.0)

    def count(self, endpoint: str, status: str) -> None:
        self.requests.setdefault(endpoint, Counter())[status] += 1

    def stats(self) -> dict[str, Any]:
        return {
            "token_requests": self.token_requests,
            "requests": {name: dict(c) for name, c in self.requests.items()},
            "amendments_applied": self.amendments_applied,
            "identifiers_received": self.identifiers_received,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "log": list(self.log),
        }


# --- answers -------------------------------------------------------------------------


def _invalid(code: str, detail: str, instance: str = "@data") -> web.Response:
    return error_response(400, problem("validation", code, detail, instance))


def _not_found(segment_id: str) -> web.Response:
    return error_response(
        404,
        problem("validation", "segment-not-found", f"segment {segment_id} was not found", "@id"),
    )


async def _json_body(request: web.Request) -> tuple[Any, web.Response | None]:
    """The parsed body, or an error answer. An empty body reads as None."""
    raw = await request.read()
    if not raw.strip():
        return None, None
    try:
        return json.loads(raw), None
    except (ValueError, UnicodeDecodeError):
        return None, _invalid("invalid-json", "the request body is not valid JSON", "@")


def _segment(state: SandboxState, request: web.Request, api: str) -> Segment | None:
    segment = state.segments.get(request.match_info["segment_id"])
    if segment is None or segment.api != api:
        return None
    account = request.match_info.get("account_id")
    if account is not None and segment.account_id != account:
        return None
    return segment


# --- OAuth2 --------------------------------------------------------------------------


async def token(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    state.token_requests += 1
    form = await request.post()
    grant = form.get("grant_type")
    if not grant:
        return web.json_response({"error": "invalid_request"}, status=400)
    config = state.config
    client_ok = secrets.compare_digest(str(form.get("client_id", "")), config.client_id)
    secret_ok = secrets.compare_digest(str(form.get("client_secret", "")), config.client_secret)
    if not (client_ok and secret_ok):
        return web.json_response({"error": "invalid_client"}, status=401)
    if grant != "client_credentials":
        return web.json_response({"error": "unsupported_grant_type"}, status=400)
    # refresh_token: null because the official SDKs read that key unconditionally.
    return web.json_response(
        {
            "access_token": state.issue_token(),
            "token_type": "Bearer",
            "expires_in": config.token_ttl_s,
            "refresh_token": None,
        }
    )


# --- contact-list amendments -----------------------------------------------------------


@dataclass(frozen=True)
class Amendment:
    operation: str
    identifier_type: str  # as sent
    type_key: str  # lower case
    identifiers: list[str]


def _describe(body: Any, entry: dict[str, Any]) -> None:
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


def _validate_amendment(body: Any, api: str, segment: Segment) -> Amendment | web.Response:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        return _invalid("required-field-missing", "data must be an object", "@data")
    # The Retail Media SDK schema makes data.type optional, so only a wrong one is refused.
    if data.get("type", _AMEND_TYPES[api][0]) not in _AMEND_TYPES[api]:
        allowed = " or ".join(_AMEND_TYPES[api])
        return _invalid("invalid-type", f"data.type must be {allowed}", "@data/type")
    attrs = data.get("attributes")
    if not isinstance(attrs, dict):
        return _invalid("required-field-missing", "attributes are required", "@data/attributes")
    operation = attrs.get("operation")
    if operation not in ("add", "remove"):
        return _invalid(
            "invalid-operation", "operation must be add or remove", "@data/attributes/operation"
        )
    id_type = attrs.get("identifierType")
    where = "@data/attributes/identifierType"
    types = RM_TYPES if api == RETAIL_MEDIA else MS_TYPES
    if not isinstance(id_type, str) or id_type.lower() not in types:
        detail = f"identifierType must be one of {', '.join(types.values())}"
        if isinstance(id_type, str) and id_type.lower() == "gum":
            detail = "Gum identifiers are not supported on Retail Media"
        return _invalid("invalid-identifier-type", detail, where)
    key = id_type.lower()
    if key == "gum":
        caller = attrs.get("gumCallerId")
        if isinstance(caller, bool) or not isinstance(caller, int):
            return _invalid(
                "gum-caller-id-required",
                "gumCallerId (an integer) is required for gum identifiers",
                "@data/attributes/gumCallerId",
            )
    identifiers = attrs.get("identifiers")
    where = "@data/attributes/identifiers"
    if not isinstance(identifiers, list):
        return _invalid("invalid-identifiers-format", "identifiers must be a list", where)
    if len(identifiers) > MAX_IDENTIFIERS:
        return _invalid(
            "too-many-identifiers",
            f"at most {MAX_IDENTIFIERS} identifiers per request, got {len(identifiers)}",
            where,
        )
    if not set(map(type, identifiers)) <= {str}:  # map: a C loop, not a Python one
        index = next(i for i, value in enumerate(identifiers) if not isinstance(value, str))
        detail = "identifiers must be strings"
        return _invalid("invalid-identifiers-format", detail, f"{where}/{index}")
    if segment.identifier_type is not None and segment.identifier_type.lower() != key:
        return _invalid(
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


def _apply(state: SandboxState, segment: Segment, change: Amendment) -> tuple[int, list[str]]:
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


def _amendment_answer(
    state: SandboxState, segment: Segment, change: Amendment, *, n_valid: int, invalid: list[str]
) -> web.Response:
    api = segment.api
    result: dict[str, Any] = {
        # An integer for both APIs: both SDK schemas say int64 (the MS docs show a string).
        "contactListId": segment.contact_list_id,
        "operation": change.operation,
        "requestDate": _now_iso(),
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


async def _amend(request: web.Request, api: str) -> web.StreamResponse:
    state = request.app[SANDBOX_STATE]
    entry: dict[str, Any] = {
        "segment_id": request.match_info["segment_id"],
        "operation": None,
        "identifier_type": None,
        "count": 0,
        "status": 0,  # 0: the connection was dropped without an answer
        "applied": False,
        "fault": None,
        "idempotency_key": request.headers.get("Idempotency-Key"),
        "at": time.time(),
    }
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        # The whole body is read first, so a dropped connection is a clean disconnect
        # for the client rather than a reset in the middle of its upload.
        body, bad_json = await _json_body(request)
        _describe(body, entry)
        state.identifiers_received += entry["count"]

        def answer() -> web.Response:
            segment = _segment(state, request, api)
            if segment is None:
                return _not_found(entry["segment_id"])
            if bad_json is not None:
                return bad_json
            change = _validate_amendment(body, api, segment)
            if isinstance(change, web.Response):
                return change
            n_valid, invalid = _apply(state, segment, change)
            entry["applied"] = True
            return _amendment_answer(state, segment, change, n_valid=n_valid, invalid=invalid)

        response = await with_faults(request, state.faults, entry, answer)
        entry["status"] = 0 if isinstance(response, DroppedResponse) else response.status
        return response
    finally:
        state.in_flight -= 1
        state.log.append(entry)


# --- clear and statistics ----------------------------------------------------------------


async def _clear(request: web.Request, api: str) -> web.Response:
    state = request.app[SANDBOX_STATE]
    await asyncio.sleep(state.faults.latency_s())
    segment = _segment(state, request, api)
    if segment is None:
        return _not_found(request.match_info["segment_id"])
    segment.members.clear()
    segment.counted = 0
    if api == RETAIL_MEDIA:
        return web.Response(status=204)
    data = {"type": "ContactListAudienceSegment", "id": segment.id}
    return web.json_response({"data": data, "errors": [], "warnings": []})


async def _statistics(request: web.Request, api: str) -> web.Response:
    state = request.app[SANDBOX_STATE]
    await asyncio.sleep(state.faults.latency_s())
    segment = _segment(state, request, api)
    if segment is None:
        return _not_found(request.match_info["segment_id"])
    size = segment.size(state.config.keep_members)
    attrs = {"numberOfIdentifiers": size, "numberOfMatches": round(size * 0.5), "matchRate": 0.5}
    data = {"id": segment.id, "type": "ContactlistStatistics", "attributes": attrs}
    return web.json_response({"data": data, "errors": [], "warnings": []})


# --- segment management -------------------------------------------------------------------


def _text(value: object) -> str | None:
    # Marketing Solutions samples wrap descriptions as {"value": "..."}.
    if isinstance(value, dict):
        value = value.get("value")
    return value if isinstance(value, str) else None


def _create_one(
    state: SandboxState, api: str, account: str | None, item: Any, n: int
) -> Segment | dict[str, Any]:
    """Create one segment, or say why not as a problem pointing at ``@data/n``."""
    where = f"@data/{n}"
    attrs = item.get("attributes") if isinstance(item, dict) else None
    if not isinstance(attrs, dict):
        return problem("validation", "required-field-missing", "attributes are required", where)
    name = attrs.get("name")
    if not isinstance(name, str) or not name.strip():
        return problem("validation", "name-must-not-be-empty", "name must not be empty", where)
    if len(name) > 255:
        return problem("validation", "name-must-not-be-too-long", "name is too long", where)
    contact_list = attrs.get("contactList")
    if not isinstance(contact_list, dict):
        detail = "only contact-list segments can be created through the API"
        return problem("validation", "contact-list-required", detail, where)
    identifier_type: str | None = None
    if api == RETAIL_MEDIA:
        raw = contact_list.get("identifierType")
        identifier_type = RM_TYPES.get(raw.lower()) if isinstance(raw, str) else None
        if identifier_type is None:
            detail = f"contactList.identifierType must be one of {', '.join(RM_TYPES.values())}"
            return problem("validation", "invalid-identifier-type", detail, where)
    else:
        advertiser = attrs.get("advertiserId")
        account = str(advertiser) if isinstance(advertiser, str | int) else None
        if not account:
            detail = "advertiserId is required"
            return problem("validation", "advertiser-id-required", detail, where)
    assert account is not None
    folded = name.casefold()
    for other in state.segments.values():
        if other.api == api and other.account_id == account and other.name.casefold() == folded:
            detail = f"a segment named {name!r} already exists"
            return problem("validation", "name-must-be-unique", detail, where)
    retailer = attrs.get("retailerId")
    return state.add_segment(
        api,
        account,
        identifier_type,
        name=name,
        description=_text(attrs.get("description")),
        retailer_id=str(retailer) if isinstance(retailer, str | int) else None,
    )


async def _create(request: web.Request, api: str) -> web.Response:
    state = request.app[SANDBOX_STATE]
    body, bad_json = await _json_body(request)
    if bad_json is not None:
        return bad_json
    items = body.get("data") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return _invalid("required-field-missing", "data must be a list of segments")
    created: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    account = request.match_info.get("account_id")
    for n, item in enumerate(items):
        outcome = _create_one(state, api, account, item, n)
        if isinstance(outcome, Segment):
            created.append(outcome.entity())
        else:
            failures.append(outcome)
    # Retail Media reports per-item failures as warnings, Marketing Solutions as errors:
    # the documented behaviour of each, and a client must read both.
    errors, warnings = ([], failures) if api == RETAIL_MEDIA else (failures, [])
    return web.json_response({"data": created, "errors": errors, "warnings": warnings})


def _paging(request: web.Request, api: str) -> tuple[int, int] | web.Response:
    try:
        offset = int(request.query.get("offset", "0"))
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        return _invalid("invalid-paging", "offset and limit must be integers", "@query")
    top = _SEARCH_MAX_LIMIT[api]
    if offset < 0 or not 1 <= limit <= top:
        return _invalid("invalid-paging", f"offset >= 0 and 1 <= limit <= {top}", "@query")
    return offset, limit


def _filter(value: Any) -> set[str] | None:
    return None if not isinstance(value, list) else {str(v).lower() for v in value}


async def _search(request: web.Request, api: str) -> web.Response:
    state = request.app[SANDBOX_STATE]
    paging = _paging(request, api)
    if isinstance(paging, web.Response):
        return paging
    offset, limit = paging
    body, bad_json = await _json_body(request)
    if bad_json is not None:
        return bad_json
    data = body.get("data") if isinstance(body, dict) else None
    attrs = data.get("attributes") if isinstance(data, dict) else None
    attrs = attrs if isinstance(attrs, dict) else {}
    ids = _filter(attrs.get("audienceSegmentIds"))
    types = _filter(attrs.get("audienceSegmentTypes"))
    retailers = _filter(attrs.get("retailerIds"))
    advertisers = _filter(attrs.get("advertiserIds"))
    account = request.match_info.get("account_id")
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


# --- versions, auth, rate limit, bookkeeping -------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _guarded(
    request: web.Request, handler: Handler, first: str, headers: dict[str, str]
) -> web.StreamResponse:
    state = request.app[SANDBOX_STATE]
    if first != "oauth2":
        if first in DEPRECATED_VERSIONS:
            headers |= {"Deprecation": "true", "Sunset": DEPRECATED_VERSIONS[first]}
        elif _VERSION.fullmatch(first) and first not in SERVED_VERSIONS:
            return error_response(
                410, problem("deprecation", "api-version-retired", f"version {first} is retired")
            )
        elif first not in SERVED_VERSIONS:
            return error_response(404, problem("unknown", "not-found", "no such endpoint"))
        denied = state.check_token(request.headers.get("Authorization"))
        if denied is not None:
            detail = "the access token has expired" if denied.endswith("expired") else "bad token"
            return error_response(401, problem("authorization", denied, detail, "@headers"))
        limit = state.faults.settings.rate_limit_per_minute
        if limit is not None and not state.rate_limiter.acquire(limit):
            wait = str(state.rate_limiter.retry_after_s())
            return error_response(
                429,
                problem("quota", "too-many-requests", "the per-minute budget is spent"),
                headers={"Retry-After": wait},
            )
    try:
        return await handler(request)
    except web.HTTPException as exc:
        # Router misses (404/405) and oversized bodies (413) answer in Criteo's shape too.
        code = exc.reason.lower().replace(" ", "-")
        return error_response(exc.status, problem("unknown", code, exc.reason), headers=None)


@web.middleware
async def _api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    first = request.path.split("/", 2)[1]
    if first == "_sandbox":
        return await handler(request)
    state = request.app[SANDBOX_STATE]
    headers: dict[str, str] = {}
    response = await _guarded(request, handler, first, headers)
    limit = state.faults.settings.rate_limit_per_minute
    if limit is not None:
        headers |= state.rate_limiter.headers(limit)
    dropped = isinstance(response, DroppedResponse)
    if not dropped:
        response.headers.update(headers)
    name = request.match_info.route.name or "unmatched"
    state.count(name, "dropped" if dropped else str(response.status))
    return response


_RM = "/{version}/retail-media"
_MS = "/{version}/marketing-solutions"
_RM_ACCOUNT = _RM + "/accounts/{account_id}/audience-segments"
_RM_LIST = _RM + "/audience-segments/{segment_id}/contact-list"
_MS_LIST = _MS + "/audience-segments/{segment_id}/contact-list"
# (method, path, handler, api, endpoint name); the name keys /_sandbox/stats "requests".
_ROUTES: tuple[tuple[str, str, Callable[..., Awaitable[web.StreamResponse]], str, str], ...] = (
    ("POST", _RM_LIST + "/add-remove", _amend, RETAIL_MEDIA, "rm_add_remove"),
    ("POST", _RM_LIST + "/clear", _clear, RETAIL_MEDIA, "rm_clear"),
    ("GET", _RM_ACCOUNT + "/{segment_id}/contact-list", _statistics, RETAIL_MEDIA, "rm_statistics"),
    ("POST", _RM_ACCOUNT + "/create", _create, RETAIL_MEDIA, "rm_create"),
    ("POST", _RM_ACCOUNT + "/search", _search, RETAIL_MEDIA, "rm_search"),
    ("PATCH", _MS_LIST, _amend, MARKETING_SOLUTIONS, "ms_amend"),
    ("DELETE", _MS_LIST, _clear, MARKETING_SOLUTIONS, "ms_clear"),
    ("GET", _MS_LIST + "/statistics", _statistics, MARKETING_SOLUTIONS, "ms_statistics"),
    ("POST", _MS + "/audience-segments/create", _create, MARKETING_SOLUTIONS, "ms_create"),
    ("POST", _MS + "/audience-segments/search", _search, MARKETING_SOLUTIONS, "ms_search"),
)


def create_app(config: SandboxConfig) -> web.Application:
    """The sandbox application; its state is ``app[SANDBOX_STATE]``."""
    app = web.Application(middlewares=[_api_middleware], client_max_size=_MAX_BODY)
    app[SANDBOX_STATE] = SandboxState(config)
    app.router.add_post("/oauth2/token", token, name="token")
    for method, path, handler, api, name in _ROUTES:
        app.router.add_route(method, path, functools.partial(handler, api=api), name=name)
    app.router.add_routes(control_routes)
    return app


# --- running it ------------------------------------------------------------------------------


class RunningSandbox:
    """A sandbox serving on a real socket; ``async with`` closes it."""

    def __init__(self, url: str, app: web.Application, runner: web.AppRunner) -> None:
        self.url = url
        self.app = app
        self.state = app[SANDBOX_STATE]
        self._runner: web.AppRunner | None = runner

    async def close(self) -> None:
        """Stop serving; waits at most a second for answers still being written."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> RunningSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def start_sandbox(
    config: SandboxConfig, host: str = "127.0.0.1", port: int = 0
) -> RunningSandbox:
    """Serve a new sandbox on ``host:port`` (port 0: any free port) and return at once."""
    app = create_app(config)
    # A short shutdown timeout: a stalled amendment must not hold a test's teardown.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    return RunningSandbox(str(URL.build(scheme="http", host=host, port=bound_port)), app, runner)


async def _serve_until_signal(config: SandboxConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with await start_sandbox(config, host, port) as sandbox:
        log.info("sandbox_listening", url=sandbox.url)
        await stop.wait()
    log.info("sandbox_stopped")


def run_sandbox(config: SandboxConfig, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM: the ``syncd sandbox`` command."""
    asyncio.run(_serve_until_signal(config, host, port))
