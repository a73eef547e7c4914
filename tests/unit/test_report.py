"""The plain-text tables: numbers as people read them, whatever type the database gave."""

from __future__ import annotations

from decimal import Decimal

from syncd.report import run_summary, table
from syncd.sync import RunSummary


def test_whole_numbers_from_sums_read_as_numbers() -> None:
    # PostgreSQL's sum() of bigint is numeric: asyncpg hands back a Decimal. A run of
    # 120,000 changes showed as "1.2E+5" in `syncd status`.
    text = table(["changes", "rate"], [[Decimal("1.2E+5"), Decimal("0.5")], [7, None]])
    rows = text.splitlines()[2:]
    assert rows[0].split() == ["120,000", "0.5"]
    assert rows[1].split() == ["7", "-"]


def test_a_clear_in_a_run_summary_says_criteo_gave_no_counts() -> None:
    """A clear sends no identifiers and Criteo answers no counts: '-' rather than zeros
    that read as "Criteo took none"."""
    segment = {"segment_key": "vip", "chunks_acknowledged": 1, "chunks_failed": 0}
    segment |= {"sent": 0, "valid": 0, "invalid": 0, "error_codes": None}
    add = {**segment, "operation": "add", "sent": 2, "valid": 2}
    summary = RunSummary(
        run_id=1, status="succeeded", segments=[{**segment, "operation": "clear"}, add]
    )
    lines = run_summary(summary).splitlines()
    assert lines[3].split() == ["vip", "clear", "1", "0", "-", "-", "-", "-"]
    assert lines[4].split() == ["vip", "add", "1", "0", "2", "2", "0", "-"]
