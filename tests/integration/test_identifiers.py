"""Identifier rules: the SQL functions and the Python reference agree, case by case."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import pytest

from syncd import links, plan
from syncd.errors import UsageError
from syncd.identifiers import normalise, parse_type, wire_name
from tests.helpers import insert_changes, sha256

HEX64 = sha256("already@hashed.com")
CASES: list[tuple[str | None, str, str, tuple[str | None, str | None]]] = [
    ("  Jane.Doe@Example.COM \n", "email", "sha256", (sha256("jane.doe@example.com"), None)),
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
    ("a b@example.com", "email", "sha256", (None, "contains_whitespace")),
    ("", "email", "sha256", (None, "empty")),
    ("   ", "email", "sha256", (None, "empty")),
    (None, "email", "sha256", (None, "empty")),
    ("+33 6 12-34.56 (78)", "phoneNumber", "sha256", (sha256("33612345678"), None)),
    ("0033612345678", "phoneNumber", "sha256", (sha256("33612345678"), None)),
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
    ("x" * 256, "gum", "sha256", ("x" * 256, None)),
    # Unicode whitespace is trimmed at the ends (U+0085, no-break space, U+2028, U+3000,
    # vertical tab, form feed); inside it is refused, as are control and invisible
    # characters, wherever they are (an invisible character at an end is not trimmed).
    ("\u00a0 Jane@Example.com\u2028\u3000", "email", "sha256", (sha256("jane@example.com"), None)),
    ("\u000b\u000cjane@example.com\u0085\u2009", "email", "plain", ("jane@example.com", None)),
    ("jane\u00a0doe@example.com", "email", "sha256", (None, "contains_whitespace")),
    ("jane@exam\u2028ple.com", "email", "sha256", (None, "contains_whitespace")),
    ("jane\u000b@example.com", "email", "sha256", (None, "contains_whitespace")),
    ("jane\u000c@example.com", "email", "sha256", (None, "contains_whitespace")),
    ("jane\u200b@example.com", "email", "sha256", (None, "contains_invisible_character")),
    ("\u200bjane@example.com", "email", "sha256", (None, "contains_invisible_character")),
    ("\ufeffjane@example.com", "email", "sha256", (None, "contains_invisible_character")),
    ("jane@exam\u00adple.com", "email", "sha256", (None, "contains_invisible_character")),
    ("jane\u0001@example.com", "email", "sha256", (None, "contains_control_character")),
    ("jane\u001c@example.com", "email", "sha256", (None, "contains_control_character")),
    ("jane\u007f@example.com", "email", "sha256", (None, "contains_control_character")),
    ("jane\u009b@example.com", "email", "sha256", (None, "contains_control_character")),
    ("\u0007", "email", "sha256", (None, "contains_control_character")),
    ("\u00a0\u2003", "email", "sha256", (None, "empty")),
    # An email address is at most 254 characters, counted after trimming and lower-casing.
    ("a" * 242 + "@example.com", "email", "plain", ("a" * 242 + "@example.com", None)),
    ("a" * 243 + "@example.com", "email", "sha256", (None, "too_long")),
    ("A" * 9988 + "@example.com", "email", "sha256", (None, "too_long")),
    (" " + "é" * 242 + "@example.com ", "email", "plain", ("é" * 242 + "@example.com", None)),
    ("É" * 243 + "@example.com", "email", "sha256", (None, "too_long")),
    ("x" * 300, "email", "sha256", (None, "not_an_email")),
    # Full Unicode case mapping, the same whatever the database's collation.
    ("İSTANBUL@example.com", "email", "plain", ("i\u0307stanbul@example.com", None)),
    ("İSTANBUL@example.com", "email", "sha256", (sha256("i\u0307stanbul@example.com"), None)),
    ("STRAẞE@example.de", "email", "plain", ("straße@example.de", None)),
    # Greek: a final capital sigma lowers to the final form (U+03C2), a medial one to U+03C3.
    (
        "\u039f\u0394\u039f\u03a3@example.gr",
        "email",
        "plain",
        ("\u03bf\u03b4\u03bf\u03c2@example.gr", None),
    ),
    ("\u039f\u03a3.\u0391@example.gr", "email", "plain", ("\u03bf\u03c3.\u03b1@example.gr", None)),
    ("\u03a3\u0391@example.gr", "email", "sha256", (sha256("\u03c3\u03b1@example.gr"), None)),
    ("\u212aELVIN@EXAMPLE.COM", "email", "plain", ("kelvin@example.com", None)),
    ("ǅOKIĆ@example.hr", "email", "plain", ("ǆokić@example.hr", None)),
    ("\u13a0\u13a1@example.com", "email", "plain", ("\uab70\uab71@example.com", None)),  # Cherokee
    ("ÇAĞRI@ÖRNEK.COM.TR", "email", "plain", ("çağri@örnek.com.tr", None)),
    # A national trunk prefix written (0) after the country code is dropped; any Unicode
    # whitespace separates digits; control and invisible characters are refused.
    ("+44 (0)20 7946 0958", "phoneNumber", "plain", ("+442079460958", None)),
    ("+44 (0)20 7946 0958", "phoneNumber", "sha256", (sha256("442079460958"), None)),
    ("0044 (0) 20-7946-0958", "phoneNumber", "plain", ("+442079460958", None)),
    ("(0)20 7946 0958", "phoneNumber", "sha256", (None, "not_an_e164_phone_number")),
    (
        "+33\u00a06\u202f12\u00a034\u00a056\u00a078\u2028",
        "phoneNumber",
        "plain",
        ("+33612345678", None),
    ),
    ("+33 6 12 34 56 78\u200b", "phoneNumber", "sha256", (None, "contains_invisible_character")),
    ("+33 6 12\u001b34 56 78", "phoneNumber", "sha256", (None, "contains_control_character")),
    ("\u00a0" + HEX64.upper() + "\u2028", "phoneNumber", "sha256", (HEX64, None)),
    (
        "\u3000 6D92078A-8246-4BA4-AE5B-76104861E7DC\u00a0",
        "madid",
        "sha256",
        ("6d92078a-8246-4ba4-ae5b-76104861e7dc", None),
    ),
    (
        "6d92078a-8246-4ba4-ae5b-76104861e7dc\u200d",
        "madid",
        "sha256",
        (None, "contains_invisible_character"),
    ),
    ("\u00a0Xi-123\u2029", "identityLink", "sha256", ("Xi-123", None)),
    ("Xi\u00a0123", "identityLink", "sha256", (None, "contains_whitespace")),
    ("Xi\u2060123", "customerId", "sha256", (None, "contains_invisible_character")),
    ("Xi\U000e0041123", "userIdentifier", "sha256", (None, "contains_invisible_character")),
    ("Xi\u0085123", "userIdentifier", "sha256", (None, "contains_whitespace")),
    ("Xi\u0080123", "userIdentifier", "sha256", (None, "contains_control_character")),
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


# Every code point of the Basic Multilingual Plane, plane 1 and the start of plane 14: every
# member of the character classes (whitespace, control, invisible) and its neighbours, and
# most cased letters (planes 2-13 and the rest of 14-16 hold neither).
SWEPT = "(c BETWEEN 1 AND 131071 OR c BETWEEN 917504 AND 921600) AND c NOT BETWEEN 55296 AND 57343"
PROBES = [  # (identifier type, send_as, raw value with {c} standing for the code point)
    ("customerId", "sha256", "{c}ab{c}"),  # trimmed at the ends, or not
    ("customerId", "sha256", "a{c}b"),  # refused inside, or not
    ("email", "plain", "a{c}@example.com"),  # case mapping; the fast and the slow email paths
    ("phoneNumber", "plain", "+3361234{c}5678"),  # separators dropped, or refused
]


def swept_code_points() -> list[int]:
    ranges = (range(1, 0xD800), range(0xE000, 0x20000), range(0xE0000, 0xE1001))
    return [c for r in ranges for c in r]


@pytest.mark.parametrize(("kind", "send_as", "template"), PROBES)
async def test_sql_matches_python_code_point_by_code_point(
    conn: Any, kind: str, send_as: str, template: str
) -> None:
    """Outcomes other than 'sent as it came' agree for each code point, SQL and Python.

    Only a code point that Python's Unicode data does not assign yet may lower-case
    differently (PostgreSQL 18 has Unicode 16.0, Python 3.11 has 14.0); its reason agrees.
    """
    rows = await conn.fetch(
        "SELECT c, n.value, n.reason FROM generate_series(1, 921600) AS c, "
        "LATERAL syncd.normalise_identifier(replace($1, '{c}', chr(c)), $2, $3) AS n "
        f"WHERE {SWEPT} AND (n.value IS DISTINCT FROM replace($1, '{{c}}', chr(c)) "
        "OR n.reason IS NOT NULL)",
        template,
        kind,
        send_as,
    )
    in_sql = {r["c"]: (r["value"], r["reason"]) for r in rows}
    in_python = {}
    for c in swept_code_points():
        raw = template.replace("{c}", chr(c))
        value, reason = normalise(raw, kind, send_as)
        if value != raw or reason is not None:
            in_python[c] = (value, reason)
    differ = {
        c: (in_sql.get(c), in_python.get(c))
        for c in in_sql.keys() | in_python.keys()
        if in_sql.get(c) != in_python.get(c)
    }
    unassigned = {
        c: pair
        for c, pair in differ.items()
        if unicodedata.category(chr(c)) == "Cn"
        and all(outcome is None or outcome[1] is None for outcome in pair)
    }
    assert {hex(c): pair for c, pair in differ.items() if c not in unassigned} == {}
    assert len(in_sql) > 1000 and len(unassigned) < 50


async def test_plan_refuses_what_cannot_match_and_sends_what_python_computes(
    conn: Any,
) -> None:
    await links.link(conn, links.Link("vip", "1", "email"))
    raws = [
        "\u00a0Jane@Example.com\u2028",
        "jane\u200b@example.com",
        "a" * 243 + "@example.com",
        "İSTANBUL@example.com",
        "x\u0001@example.com",
        "a\u00a0b@example.com",
        "a" * 10_000 + "@example.com",
    ]
    await insert_changes(conn, [("vip", raw, "add") for raw in raws])
    run_id = await conn.fetchval(
        "INSERT INTO syncd.sync_runs (host, pid, target_window) VALUES ('t', 1, now()) RETURNING id"
    )
    planned = await plan.plan_segment(conn, run_id, "vip", 50_000)
    assert (planned.adds, planned.rejected) == (2, 5)
    rejected = await conn.fetch(
        "SELECT identifier, reason FROM syncd.rejected_identifiers ORDER BY change_id"
    )
    assert [r["reason"] for r in rejected] == [
        "contains_invisible_character",
        "too_long",
        "contains_control_character",
        "contains_whitespace",
        "too_long",
    ]
    assert [r["identifier"] for r in rejected] == [raws[1], raws[2], raws[4], raws[5], raws[6]]
    payload = await conn.fetchval("SELECT payload FROM syncd.chunks WHERE segment_key = 'vip'")
    assert sorted(json.loads(payload)) == sorted(
        [sha256("jane@example.com"), sha256("i\u0307stanbul@example.com")]
    )


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
