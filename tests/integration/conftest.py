"""Fixtures of the integration tier beyond tests/conftest.py's."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
async def crm(conn: Any) -> Any:
    """The test connection, with a CRM schema holding a mirror source: crm.members
    (segment_key, identifier), the shape a mirror link reads."""
    await conn.execute(
        "CREATE SCHEMA crm; CREATE TABLE crm.members (segment_key text, identifier text)"
    )
    return conn
