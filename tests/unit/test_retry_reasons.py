"""The `reason` label of syncd_request_retries_total: a few fixed words, whatever Criteo says."""

from __future__ import annotations

import pytest

from syncd.daemon.metrics import retry_reason
from syncd.errors import RetryableError


@pytest.mark.parametrize(
    ("status", "code", "reason"),
    [
        (None, "timeout", "timeout"),  # no answer within SYNCD_HTTP_TIMEOUT_S
        (None, "connection", "connection"),  # refused, reset, DNS
        (408, None, "timeout"),
        (503, "timeout", "server_error"),  # Criteo's own code never becomes a label
        (500, "anything-criteo-says", "server_error"),
        (200, "unreadable", "other"),  # a token answer that is not one
    ],
)
def test_reasons(status: int | None, code: str | None, reason: str) -> None:
    assert retry_reason(RetryableError("x", status=status, code=code)) == reason
