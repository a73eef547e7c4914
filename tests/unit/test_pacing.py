"""Pacing to what Criteo says: the limit learned from x-ratelimit-*, a small burst only,
the user's ceiling, and a hold until the reset when nothing is left. Injected clocks."""

from __future__ import annotations

import pytest

from syncd.criteo.pacing import BURST, PACING_MARGIN, Pacer


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def sends(pacer: Pacer, clock: Clock, calls: int) -> list[float]:
    """When each of `calls` calls goes, each waiting as told (one sender after another)."""
    times = []
    for _ in range(calls):
        clock.now += pacer.reserve()
        times.append(clock.now)
    return times


def test_until_an_answer_tells_criteos_documented_budget_is_assumed() -> None:
    clock = Clock()
    pacer = Pacer(0, clock, clock)
    assert pacer.per_minute() == 250
    assert sends(pacer, clock, BURST + 1)[-1] > 1_000.0  # a burst of BURST, no more


def test_an_api_that_meters_nothing_and_no_ceiling_means_no_pacing() -> None:
    clock = Clock()
    pacer = Pacer(0, clock, clock)
    pacer.observe({})  # an answer without x-ratelimit-* headers
    assert sends(pacer, clock, 5) == [1_000.0] * 5
    pacer.observe({"x-ratelimit-limit": "120"})  # ...until one says otherwise
    assert pacer.per_minute() == 120
    pacer.observe({})  # a later answer without them (a proxy's) forgets nothing
    assert pacer.per_minute() == 120


def test_the_limit_is_learned_and_only_a_small_burst_goes_at_once() -> None:
    clock = Clock()
    pacer = Pacer(0, clock, clock)
    pacer.observe({"x-ratelimit-limit": "60", "x-ratelimit-remaining": "59"})
    times = sends(pacer, clock, 10)
    assert times[:BURST] == [1_000.0] * BURST  # a minute's worth never goes at once
    interval = 60 / (60 * PACING_MARGIN)
    gaps = [b - a for a, b in zip(times[BURST - 1 :], times[BURST:], strict=False)]
    assert gaps == pytest.approx([interval] * len(gaps))
    # Any 60 s holds fewer calls than the limit: fits a fixed window and a bucket.
    assert pacer.per_minute() == 60


def test_the_ceiling_caps_what_criteo_allows_and_a_lower_limit_wins() -> None:
    clock = Clock()
    pacer = Pacer(30, clock, clock)
    pacer.observe({"x-ratelimit-limit": "250"})
    assert pacer.per_minute() == 30
    pacer.observe({"x-ratelimit-limit": "20"})
    assert pacer.per_minute() == 20


def test_nothing_left_holds_every_call_until_the_reset() -> None:
    clock = Clock()
    wall = Clock()
    wall.now = 1_700_000_000.0
    pacer = Pacer(250, clock, wall)
    pacer.observe(
        {
            "x-ratelimit-limit": "250",
            "x-ratelimit-remaining": "0",
            "x-ratelimit-reset": "1700000042",
        }
    )
    assert pacer.reserve() == pytest.approx(42.0)


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-limit": "many"},
        {"x-ratelimit-limit": "nan", "x-ratelimit-remaining": "0"},
        {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "soon"},
        {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1000"},  # long past
        {"x-ratelimit-limit": "0"},
    ],
)
def test_headers_that_say_nothing_usable_change_nothing(headers: dict[str, str]) -> None:
    clock = Clock()
    pacer = Pacer(0, clock, clock)
    pacer.observe(headers)
    assert pacer.per_minute() is None and sends(pacer, clock, 3) == [1_000.0] * 3


def test_a_hold_from_a_wrong_header_is_capped() -> None:
    clock = Clock()
    pacer = Pacer(250, clock, clock)
    pacer.observe({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1e12"})
    assert pacer.reserve() <= 3600.0 + 1.0
