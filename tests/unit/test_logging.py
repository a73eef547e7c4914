"""Log lines: one JSON shape for structlog and the standard library, tracebacks included."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from syncd.logging import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def _boom() -> None:
    raise RuntimeError("the pool went away")


@pytest.mark.parametrize("logger", ["stdlib", "structlog"])
def test_an_exception_logged_carries_its_traceback(
    capsys: pytest.CaptureFixture[str], logger: str
) -> None:
    configure_logging("info", "json")
    try:
        _boom()
    except RuntimeError:
        if logger == "stdlib":  # what the CLI does with an unexpected error
            logging.getLogger("syncd").exception("unexpected_error")
        else:
            structlog.get_logger("syncd").exception("unexpected_error")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    line = json.loads(lines[0])
    assert line["event"] == "unexpected_error"
    assert "exc_info" not in line, line
    assert "Traceback" in line["exception"], line
    assert "RuntimeError: the pool went away" in line["exception"], line
    assert "_boom" in line["exception"], line
