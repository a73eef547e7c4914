"""Identifier rules: the SQL functions and the Python reference agree, case by case."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from syncd.errors import UsageError
from syncd.identifiers import normalise, parse_type, wire_name


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


HEX64 = sha("already@hashed.com")
CASES: list[tuple[str | None, str, str, tuple[str | None, str | None]]] = [
    ("  Jane.Doe@Example.COM \n", "email", "sha256", (sha("jane.doe@example.com"), None)),
    ("Jane.Doe@Example.COM", "email", "plain", ("jane.doe@example.com", None)),
    # Non-ASCII takes the database collation's lower() (ASCII a byte-wise one).
    (" Émile.Zoë@Exemple.FR", "email", "plain", ("émile.zoë@exemple.fr", None)),
    (HEX64.upper(), "email", "sha256", (HEX64, None)),  # never hashed twice
    (
        "0cc175b9c0f1b6a831c399e269772661",
        "email",
        "sha256",
        ("0cc175b9c0f1b6a831c399e269772661", None),
    ),
    ("no-at-sign.example.com", "email", "sha256", (None, "not_an_email")),
    ("two@@example.com", "email", "sha256", (None, "not_an_email")),
    ("a@nodot", "email", "sha256", (None, "not_an_email")),
    ("a b@example.com", "email", "sha256", (None, "not_an_email")),
    ("", "email", "sha256", (None, "empty")),
    ("   ", "email", "sha256", (None, "empty")),
    (None, "email", "sha256", (None, "empty")),
    ("+33 6 12-34.56 (78)", "phoneNumber", "sha256", (sha("33612345678"), None)),
    ("0033612345678", "phoneNumber", "sha256", (sha("33612345678"), None)),
    ("0033612345678", "phoneNumber", "plain", ("+33612345678", None)),
    ("0612345678", "phoneNumber", "sha256", (None, "not_an_e164_phone_number")),
    ("+1234", "phoneNumber", "sha256", (None, "not_an_e164_phone_number")),
    (HEX64, "phoneNumber", "sha256", (HEX64, None)),
    (
        "6D92078A-8246-4BA4-AE5B-76104861E7DC",
        "madid",
        "sha256",
        ("6d92078a-8246-4ba4-ae5b-76104861e7dc", None),
    ),
    ("not-a-uuid", "madid", "sha256", (None, "not_a_mobile_ad_id")),
    (" Xi-123 ", "identityLink", "sha256", ("Xi-123", None)),
    ("has space", "customerId", "sha256", (None, "contains_whitespace")),
    ("x" * 257, "gum", "sha256", (None, "too_long")),
]


@pytest.mark.parametrize(("raw", "kind", "send_as", "expected"), CASES)
def test_python_reference(
    raw: str | None, kind: str, send_as: str, expected: tuple[str | None, str | None]
) -> None:
    assert normalise(raw, kind, send_as) == expected


async def test_sql_matches_python(conn: Any) -> None:
    for raw, kind, send_as, expected in CASES:
        row = await conn.fetchrow(
            "SELECT value, reason FROM syncd.normalise_identifier($1, $2, $3)", raw, kind, send_as
        )
        assert (row["value"], row["reason"]) == expected, (raw, kind)


def test_types_per_api() -> None:
    assert parse_type("EMAIL", "retail-media").name == "email"
    assert parse_type("phone", "marketing-solutions").name == "phoneNumber"
    assert wire_name("email", "retail-media") == "Email"
    assert wire_name("email", "marketing-solutions") == "email"
    assert wire_name("customerId", "retail-media") == "CustomerId"
    with pytest.raises(UsageError, match="does not accept identifier type 'gum'"):
        parse_type("gum", "retail-media")
    with pytest.raises(UsageError, match="does not accept identifier type 'customerId'"):
        parse_type("customerid", "marketing-solutions")
    with pytest.raises(UsageError, match="unknown identifier type 'fax'"):
        parse_type("fax", "retail-media")
    with pytest.raises(UsageError, match="unknown API"):
        parse_type("email", "display")
