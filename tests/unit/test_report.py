"""The plain-text tables: numbers as people read them, whatever type the database gave."""

from __future__ import annotations

from decimal import Decimal

from syncd.report import table


def test_whole_numbers_from_sums_read_as_numbers() -> None:
    # PostgreSQL's sum() of bigint is numeric: asyncpg hands back a Decimal. A run of
    # 120,000 changes showed as "1.2E+5" in `syncd status`.
    text = table(["changes", "rate"], [[Decimal("1.2E+5"), Decimal("0.5")], [7, None]])
    rows = text.splitlines()[2:]
    assert rows[0].split() == ["120,000", "0.5"]
    assert rows[1].split() == ["7", "-"]
