"""Identifier types: which API accepts which, how each is spelled on the wire, how it is normalised.

The normalisation that runs on every change is the SQL function
`syncd.normalise_identifier` (sql/0001_init.sql; its current rules are sql/0005), so
PostgreSQL does it as a set operation. `normalise` below is the same rules in Python:
the reference the tests hold the SQL to, and what the benchmark's sequential baseline uses.
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


# Retail Media spellings follow the SDK enum; Marketing Solutions spellings follow its enum.
# Retail Media `Gum` is left out: it has no gumCallerId field, so Criteo cannot match it.
TYPES: dict[str, IdentifierType] = {
    t.name.lower(): t
    for t in (
        IdentifierType("email", {RETAIL_MEDIA: "Email", MARKETING_SOLUTIONS: "email"}),
        IdentifierType(
            "phoneNumber", {RETAIL_MEDIA: "PhoneNumber", MARKETING_SOLUTIONS: "phoneNumber"}
        ),
        IdentifierType(
            "identityLink", {RETAIL_MEDIA: "IdentityLink", MARKETING_SOLUTIONS: "identityLink"}
        ),
        IdentifierType("madid", {MARKETING_SOLUTIONS: "madid"}),
        IdentifierType("gum", {MARKETING_SOLUTIONS: "gum"}),
        IdentifierType("customerId", {RETAIL_MEDIA: "CustomerId"}),
        IdentifierType("userIdentifier", {RETAIL_MEDIA: "UserIdentifier"}),
    )
}
_ALIASES = {"phone": "phonenumber", "customerid": "customerid", "mobileadid": "madid"}


def parse_type(raw: str, api: str) -> IdentifierType:
    """The identifier type a user named, if the API accepts it; UsageError otherwise."""
    if api not in APIS:
        raise UsageError(f"unknown API {api!r}; use one of {', '.join(APIS)}")
    found = find_type(raw)
    if found is None:
        known = ", ".join(t.name for t in TYPES.values())
        raise UsageError(f"unknown identifier type {raw!r}; use one of {known}")
    if api not in found.wire:
        accepted = ", ".join(t.name for t in TYPES.values() if api in t.wire)
        raise UsageError(
            f"the {api} API does not accept identifier type {found.name!r}; it accepts {accepted}"
        )
    return found


def find_type(raw: str) -> IdentifierType | None:
    """The identifier type a name stands for, whatever its case, '_' or '-' (or None)."""
    key = raw.strip().lower().replace("_", "").replace("-", "")
    return TYPES.get(_ALIASES.get(key, key))


def wire_name(type_name: str, api: str) -> str:
    return TYPES[type_name.lower()].wire[api]


# Unicode White_Space, the property's 25 code points: trimmed at both ends of every
# identifier (and segment keys are refused when they have any there). Not str.strip()'s
# default set, which also holds the control characters U+001C-U+001F.
WHITESPACE = (
    " \t\n\v\f\r\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
# Characters refused inside an identifier, checked in this order (the SQL twin spells the
# same code points): whitespace, control characters (lone surrogates too, which only a
# Python string can hold and which could not be encoded), then invisible characters, the
# Unicode Default_Ignorable_Code_Point property.
_SPACE_CLASS = r"\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # WHITESPACE
_REFUSED = (
    (re.compile(f"[{_SPACE_CLASS}]"), "contains_whitespace"),
    (re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]"), "contains_control_character"),
    (
        re.compile(
            r"[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
            r"\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
            r"\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
        ),
        "contains_invisible_character",
    ),
)
EMAIL_MAX = 254  # characters in an email address (RFC 5321's path limit less the brackets)
OTHER_MAX = 256
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX64_ANY_CASE = re.compile(r"^[0-9a-fA-F]{64}$")
_HEX32_OR_64 = re.compile(r"^([0-9a-f]{64}|[0-9a-f]{32})$")
_EMAIL = re.compile(r"^[^@]+@[^@]+\.[^@]+$")
# The common case in one test, as in SQL: an address of printable ASCII only.
_ASCII_EMAIL = re.compile(r"[!-?A-~]+@[!-?A-~]+\.[!-?A-~]+")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
# Dropped from phone numbers: whitespace, dots, dashes; then '(0)', then brackets.
_PHONE_SEPARATORS = re.compile(f"[{_SPACE_CLASS}.-]")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def normalise(
    raw: str | None, type_name: str, send_as: str = "sha256"
) -> tuple[str | None, str | None]:
    """(value to send, None) or (None, reason it cannot be sent). Mirrors the SQL function."""
    if raw is None:
        return None, "empty"
    trimmed = raw.strip(WHITESPACE)
    hashed = False
    if type_name in ("email", "madid"):
        # Full Unicode case mapping, as PostgreSQL's pg_unicode_fast does ('İ' -> 'i̇').
        canon = trimmed.lower()
        hashed = bool((_HEX32_OR_64 if type_name == "email" else _HEX64).fullmatch(canon))
    elif type_name == "phoneNumber" and _HEX64_ANY_CASE.fullmatch(trimmed):
        canon, hashed = trimmed.lower(), True
    elif type_name == "phoneNumber":
        digits = _PHONE_SEPARATORS.sub("", raw).replace("(0)", "")
        digits = digits.replace("(", "").replace(")", "")
        canon = "+" + digits[2:] if digits.startswith("00") else digits
    else:
        canon = trimmed
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
    if type_name == "email" and len(canon) <= EMAIL_MAX and _ASCII_EMAIL.fullmatch(canon):
        return None
    for refused, reason in _REFUSED:
        if refused.search(canon):
            return reason
    if type_name == "email":
        if not _EMAIL.fullmatch(canon):
            return "not_an_email"
        return "too_long" if len(canon) > EMAIL_MAX else None
    if type_name == "phoneNumber" and not _E164.fullmatch(canon):
        return "not_an_e164_phone_number"
    if type_name == "madid" and not _UUID.fullmatch(canon):
        return "not_a_mobile_ad_id"
    if len(canon) > OTHER_MAX:
        return "too_long"
    return None
