"""Identifier types: which API accepts which, how each is spelled on the wire, how it is normalised.

The normalisation that runs on every change is the SQL function
`syncd.normalise_identifier` (sql/0001_init.sql), so PostgreSQL does it as a set
operation. `normalise` below is the same rules in Python: the reference the tests
hold the SQL to, and what the benchmark's sequential baseline uses.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from syncd.errors import UsageError

RETAIL_MEDIA = "retail-media"
MARKETING_SOLUTIONS = "marketing-solutions"
APIS = (RETAIL_MEDIA, MARKETING_SOLUTIONS)
SEND_AS = ("sha256", "plain")


@dataclass(frozen=True)
class IdentifierType:
    name: str  # syncd's canonical name, stored in syncd.segments
    wire: dict[str, str]  # API -> spelling of identifierType in requests (absent: unsupported)
    hashable: bool  # emails and phone numbers are hashed with SHA-256 unless sent plain


# Retail Media spellings follow the SDK enum; Marketing Solutions spellings follow its enum.
# Retail Media `Gum` is left out: it has no gumCallerId field, so Criteo cannot match it.
TYPES: dict[str, IdentifierType] = {
    t.name.lower(): t
    for t in (
        IdentifierType(
            "email", {RETAIL_MEDIA: "Email", MARKETING_SOLUTIONS: "email"}, hashable=True
        ),
        IdentifierType(
            "phoneNumber",
            {RETAIL_MEDIA: "PhoneNumber", MARKETING_SOLUTIONS: "phoneNumber"},
            hashable=True,
        ),
        IdentifierType(
            "identityLink",
            {RETAIL_MEDIA: "IdentityLink", MARKETING_SOLUTIONS: "identityLink"},
            hashable=False,
        ),
        IdentifierType("madid", {MARKETING_SOLUTIONS: "madid"}, hashable=False),
        IdentifierType("gum", {MARKETING_SOLUTIONS: "gum"}, hashable=False),
        IdentifierType("customerId", {RETAIL_MEDIA: "CustomerId"}, hashable=False),
        IdentifierType("userIdentifier", {RETAIL_MEDIA: "UserIdentifier"}, hashable=False),
    )
}
_ALIASES = {"phone": "phonenumber", "customerid": "customerid", "mobileadid": "madid"}


def parse_type(raw: str, api: str) -> IdentifierType:
    """The identifier type a user named, if the API accepts it; UsageError otherwise."""
    if api not in APIS:
        raise UsageError(f"unknown API {api!r}; use one of {', '.join(APIS)}")
    key = raw.strip().lower().replace("_", "").replace("-", "")
    found = TYPES.get(_ALIASES.get(key, key))
    if found is None:
        known = ", ".join(t.name for t in TYPES.values())
        raise UsageError(f"unknown identifier type {raw!r}; use one of {known}")
    if api not in found.wire:
        accepted = ", ".join(t.name for t in TYPES.values() if api in t.wire)
        raise UsageError(
            f"the {api} API does not accept identifier type {found.name!r}; it accepts {accepted}"
        )
    return found


def wire_name(type_name: str, api: str) -> str:
    return TYPES[type_name.lower()].wire[api]


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX32_OR_64 = re.compile(r"^([0-9a-f]{64}|[0-9a-f]{32})$")
_EMAIL = re.compile(r"^[^@]+@[^@]+\.[^@]+$")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_PHONE_NOISE = re.compile(r"[ \t\r\n().-]")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_SPACE = re.compile(r"[ \t\r\n]")
_TRIM = " \t\r\n"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def normalise(
    raw: str | None, type_name: str, send_as: str = "sha256"
) -> tuple[str | None, str | None]:
    """(value to send, None) or (None, reason it cannot be sent). Mirrors the SQL function."""
    if raw is None:
        return None, "empty"
    hashed = False
    if type_name in ("email", "madid"):
        canon = raw.strip(_TRIM).lower()
        hashed = bool((_HEX32_OR_64 if type_name == "email" else _HEX64).fullmatch(canon))
    elif type_name == "phoneNumber":
        lowered = raw.strip(_TRIM).lower()
        hashed = bool(_HEX64.fullmatch(lowered))
        canon = lowered if hashed else re.sub(r"^00", "+", _PHONE_NOISE.sub("", raw))
    else:
        canon = raw.strip(_TRIM)
    reason = _reason(canon, type_name, hashed)
    if reason:
        return None, reason
    if hashed or send_as != "sha256":
        return canon, None
    if type_name == "email":
        return _sha256(canon), None
    if type_name == "phoneNumber":
        return _sha256(canon[1:]), None
    return canon, None


def _reason(canon: str, type_name: str, hashed: bool) -> str | None:
    if not canon:
        return "empty"
    if hashed:
        return None
    if type_name == "email" and (not _EMAIL.fullmatch(canon) or _SPACE.search(canon)):
        return "not_an_email"
    if type_name == "phoneNumber" and not _E164.fullmatch(canon):
        return "not_an_e164_phone_number"
    if type_name == "madid" and not _UUID.fullmatch(canon):
        return "not_a_mobile_ad_id"
    if _SPACE.search(canon):
        return "contains_whitespace"
    if len(canon) > 256:
        return "too_long"
    return None
