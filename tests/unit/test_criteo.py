"""The Criteo client's pure parts: reading answers, Retry-After, backoff, pacing."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from syncd.criteo import parse_amendment, retry_after_s
from syncd.criteo.client import RETRY_AFTER_CAP_S
from syncd.criteo.pacing import backoff_s


def test_both_documented_answer_shapes_are_read() -> None:
    attrs = {
        "contactListId": 523103620165619701,
        "operation": "add",
        "requestDate": "2024-04-22T14:29:07.994Z",
        "identifierType": "email",
        "nbValidIdentifiers": 3,
        "nbInvalidIdentifiers": 1,
        "sampleInvalidIdentifiers": ["bad"],
    }
    docs = parse_amendment(
        200, {"data": {"type": "x", "attributes": attrs}, "warnings": [{"code": "w"}]}
    )
    sdk = parse_amendment(200, {"data": attrs, "errors": [{"code": "e"}]})
    for result in (docs, sdk):
        assert (result.nb_valid, result.nb_invalid, result.sample_invalid) == (3, 1, ["bad"])
        assert result.contact_list_id == "523103620165619701"  # beyond 2^53, exact
        assert result.request_date is not None and result.request_date.year == 2024
    assert docs.warnings == [{"code": "w"}] and sdk.errors == [{"code": "e"}]


def test_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert retry_after_s(CIMultiDict({"Retry-After": "2"}), lambda: now) == 2.0
    assert retry_after_s(CIMultiDict({"Retry-After": "-5"}), lambda: now) == 0.0
    date = "Tue, 14 Nov 2023 22:13:30 GMT"  # now + 10 s
    assert retry_after_s(CIMultiDict({"Retry-After": date}), lambda: now) == pytest.approx(10)
    reset = {"x-ratelimit-reset": str(int(now) + 7)}
    assert retry_after_s(CIMultiDict(reset), lambda: now) == 7.0
    assert retry_after_s(CIMultiDict(), lambda: now) is None


def test_backoff_is_capped_full_jitter() -> None:
    samples = [backoff_s(attempt, 0.5, 4.0) for attempt in range(1, 12) for _ in range(50)]
    assert all(0 <= s <= 4.0 for s in samples)
    assert max(backoff_s(1, 0.5, 4.0) for _ in range(200)) <= 0.5
    assert max(samples) > 2.0  # it does grow


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "inf"}, RETRY_AFTER_CAP_S),
        ({"Retry-After": "1e400"}, RETRY_AFTER_CAP_S),
        ({"Retry-After": "99999999999999999999999"}, RETRY_AFTER_CAP_S),
        ({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}, RETRY_AFTER_CAP_S),
        ({"Retry-After": "Fri, 31 Dec 99999 23:59:59 GMT"}, None),
        ({"x-ratelimit-reset": "1700000000000000"}, RETRY_AFTER_CAP_S),
        ({"Retry-After": "nan"}, None),
        ({"x-ratelimit-reset": "nan"}, None),
        ({"Retry-After": "-inf"}, 0.0),
        ({"Retry-After": "soon", "x-ratelimit-reset": "1700000003"}, 3.0),
    ],
)
def test_absurd_rate_limit_headers_are_bounded(
    headers: dict[str, str], expected: float | None
) -> None:
    assert retry_after_s(CIMultiDict(headers), lambda: 1_700_000_000.0) == expected


def test_answer_fields_of_the_wrong_kind_read_as_unknown() -> None:
    data = {
        "nbValidIdentifiers": 2**31,
        "nbInvalidIdentifiers": True,
        "sampleInvalidIdentifiers": 3,
        "contactListId": {"id": 1},
        "requestDate": "0001-01-01T00:00:00+05:00",
    }
    result = parse_amendment(200, {"data": data, "warnings": 3, "errors": "e"})
    assert (result.nb_valid, result.nb_invalid, result.sample_invalid) == (None, None, [])
    assert (result.contact_list_id, result.request_date) == (None, None)
    assert (result.warnings, result.errors) == ([3], ["e"])
    counts = parse_amendment(200, {"data": {"nbValidIdentifiers": 3.0, "nbInvalidIdentifiers": -1}})
    assert (counts.nb_valid, counts.nb_invalid) == (3, None)
