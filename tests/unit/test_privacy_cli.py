"""Privacy commands, the pure parts: type names, reading the value from stdin, the proof's
wording for each state a remove can be in, the suppression list's shortened keys."""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import pytest

from syncd import privacy
from syncd.errors import UsageError
from syncd.privacy_cli import _identifier, remove_state, suppressions_table

NOW = dt.datetime(2026, 12, 1, 6, 0, tzinfo=dt.UTC)


def test_identifier_types_are_named_like_links_name_them() -> None:
    assert privacy.type_name("email") == "email"
    assert privacy.type_name("Phone") == "phoneNumber"
    assert privacy.type_name("mobile-ad-id") == "madid"
    assert privacy.type_name("customer_id") == "customerId"
    with pytest.raises(UsageError, match="unknown identifier type 'shoe'; use one of email"):
        privacy.type_name("shoe")


def test_dash_reads_the_identifier_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("jane@example.com\n"))
    assert _identifier("-") == "jane@example.com"
    assert _identifier("given@example.com") == "given@example.com"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(UsageError, match="no identifier on stdin"):
        _identifier("-")


def row(**given: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "segment_key": "rm",
        "open_state": None,
        "acknowledged_at": None,
        "request_date": None,
        "attempts": 0,
        "available_at": NOW,
        "last_error": None,
    }
    return {**base, **given}


def test_each_state_of_a_remove_is_said_plainly() -> None:
    acked = NOW - dt.timedelta(minutes=5)
    assert remove_state(row(segment_key=None), NOW).startswith("nothing to remove")
    assert (
        remove_state(row(acknowledged_at=NOW, request_date=acked), NOW)
        == "acknowledged 2026-12-01 05:55:00 (Criteo request date)"
    )
    assert remove_state(row(open_state="pending"), NOW) == "pending: waits for the next run"
    later = NOW + dt.timedelta(minutes=2)
    assert (
        remove_state(row(open_state="pending", available_at=later, last_error="HTTP 503"), NOW)
        == "pending: retry due 2026-12-01 06:02:00; last error: HTTP 503"
    )
    assert remove_state(row(open_state="claimed"), NOW) == "pending: being sent by a run now"
    assert remove_state(row(open_state="failed", attempts=5), NOW).startswith(
        "pending: failed after 5 attempt(s), the next run retries"
    )
    assert remove_state(row(), NOW).startswith("not sent: its chunk was dropped")


def test_the_suppression_list_shows_shortened_keys_only() -> None:
    key = "ab" * 32
    text = suppressions_table(
        [
            {
                "identifier_type": "email",
                "hashed_identifier": key,
                "reason": "unsubscribed",
                "source": "consent_withdrawal",
                "created_at": NOW,
            }
        ]
    )
    assert key not in text and key[:12] + "…" in text
    assert "1 suppression(s)" in text
    assert suppressions_table([]).startswith("no suppression")
