"""Criteo's API: the client (token, transport, error classes) and what syncd sends with it."""

from __future__ import annotations

from syncd.criteo.audiences import (
    AmendmentBody,
    AmendmentResult,
    Target,
    amend,
    amendment_body,
    parse_amendment,
)
from syncd.criteo.client import Answer, CriteoClient, retry_after_s

__all__ = [
    "AmendmentBody",
    "AmendmentResult",
    "Answer",
    "CriteoClient",
    "Target",
    "amend",
    "amendment_body",
    "parse_amendment",
    "retry_after_s",
]
