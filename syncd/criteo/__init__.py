"""Criteo's API: the client (token, transport, error classes) and what syncd sends with it."""

from __future__ import annotations

from syncd.criteo.audiences import (
    CLEAR,
    AmendmentBody,
    AmendmentResult,
    Target,
    amend,
    amendment_body,
    clear_list,
    parse_amendment,
    send_chunk,
)
from syncd.criteo.client import Answer, CriteoClient, retry_after_s

__all__ = [
    "CLEAR",
    "AmendmentBody",
    "AmendmentResult",
    "Answer",
    "CriteoClient",
    "Target",
    "amend",
    "amendment_body",
    "clear_list",
    "parse_amendment",
    "retry_after_s",
    "send_chunk",
]
