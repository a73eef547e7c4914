"""Acceptance tests run the real `syncd` as subprocesses: none outlives its test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.helpers import Cli


@pytest.fixture(autouse=True)
async def _reap_processes() -> AsyncIterator[None]:
    """Kill and wait for every process a failed test left running."""
    yield
    await Cli.reap()
