"""The sandbox's state model: configuration, segments and their members, tokens, counters.

One :class:`SandboxState` per application (``app[SANDBOX_STATE]``) holds everything a
running sandbox remembers, and tests read it directly through ``RunningSandbox.state``.
It also holds the per-minute budgets (:class:`Budgets`, one per client id): like the
tokens, they are what the sandbox remembers between calls, while ``faults`` owns the
settings.

This module knows nothing of routes or request bodies: the handlers in ``app``
and the Criteo rules in ``contract`` act on it, never the other way round.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from syncd.sandbox.budget import Budgets
from syncd.sandbox.config import (
    LOG_SIZE,
    MARKETING_SOLUTIONS,
    MS_SEGMENT_BASE,
    MS_TYPES,
    RETAIL_MEDIA,
    RM_CONTACT_LIST_BASE,
    RM_SEGMENT_BASE,
    RM_TYPES,
    SandboxConfig,
)
from syncd.sandbox.faults import FaultInjector


def now_iso() -> str:
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
    updated_at: str = ""
    # Created in Criteo's UI: the API may not edit it (contactList.isReadOnly).
    read_only: bool = False
    # Used by an audience: Criteo refuses to delete it (segment-must-not-be-used-in-audience).
    in_use: bool = False
    # Criteo computes no contact-list statistics for it (contact-list-statistics-not-supported).
    statistics_supported: bool = True

    def size(self, keep_members: bool) -> int:
        return len(self.members) if keep_members else self.counted

    def entity(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "type": "ContactList",
            "createdAt": self.created_at,
            "updatedAt": self.updated_at or self.created_at,
        }
        if self.api == RETAIL_MEDIA:
            attrs |= {
                "accountId": self.account_id,
                "retailerId": self.retailer_id,
                "createdById": None,
                "channels": ["Offsite"],
                "contactList": {
                    "isReadOnly": self.read_only,
                    "identifierType": self.identifier_type,
                    "sharingStatus": "NotShared",
                },
            }
        else:
            contact_list = {"isReadOnly": self.read_only}
            attrs |= {"advertiserId": self.account_id, "contactList": contact_list}
        return {"id": self.id, "type": "AudienceSegment", "attributes": attrs}


class SandboxState:
    """Everything the sandbox remembers: segments, members, tokens, counters, faults."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.faults = FaultInjector(config)
        self.budgets = Budgets()
        self.tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.token_clients: dict[str, str] = {}  # token -> the client id it was issued to
        self.reset()

    def reset(self) -> None:
        """Back to the start: the initial segments only, empty; no counters, no faults;
        tokens stay valid."""
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
        self.budgets.reset()
        for segment in self.config.segments:
            self.seed_segment(segment.body())

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
        base = RM_SEGMENT_BASE if api == RETAIL_MEDIA else MS_SEGMENT_BASE
        sid = segment_id or str(base + self._serial)
        segment = Segment(
            id=sid,
            api=api,
            account_id=account_id,
            identifier_type=identifier_type,
            name=name or f"sandbox segment {sid}",
            description=description,
            retailer_id=retailer_id,
            contact_list_id=RM_CONTACT_LIST_BASE + self._serial,
            created_at=now_iso(),
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
        flags = {key: body.get(key) for key in ("read_only", "in_use", "statistics_supported")}
        if any(v is not None and not isinstance(v, bool) for v in flags.values()):
            raise ValueError("read_only, in_use and statistics_supported must be true or false")
        segment = self.add_segment(
            api,
            str(body.get("account_id") or "1000"),
            identifier_type,
            segment_id=segment_id,
            name=name if isinstance(name, str) else None,
            retailer_id=None if retailer is None else str(retailer),
        )
        segment.read_only = bool(flags["read_only"])
        segment.in_use = bool(flags["in_use"])
        segment.statistics_supported = flags["statistics_supported"] is not False
        return segment

    def next_shape(self) -> str:
        shape = self.config.response_shape
        if shape == "alternate":
            shape = "docs" if self._answers % 2 == 0 else "sdk"
        self._answers += 1
        return shape

    def issue_token(self, client_id: str | None = None) -> str:
        token = secrets.token_urlsafe(32)
        self.tokens[token] = time.monotonic() + self.config.token_ttl_s
        self.token_clients[token] = client_id or self.config.client_id
        return token

    def client_of(self, header: str | None) -> str | None:
        """The client id a (checked) Authorization header's token was issued to."""
        _, _, token = (header or "").partition(" ")
        return self.token_clients.get(token.strip())

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


SANDBOX_STATE: web.AppKey[SandboxState] = web.AppKey("sandbox_state")
