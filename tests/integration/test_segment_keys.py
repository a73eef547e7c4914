"""Segment keys are compared exactly everywhere: a key with whitespace at an end is refused
at link time, and inbox rows under such a key are reported as never matching."""

from __future__ import annotations

from typing import Any

import pytest

from syncd import links, report, status
from syncd.errors import UsageError
from tests.helpers import insert_changes


@pytest.mark.parametrize("key", [" vip", "vip ", "vip\t", "\u00a0vip", "vip\u2028"])
async def test_link_refuses_a_key_with_whitespace_at_an_end(conn: Any, key: str) -> None:
    with pytest.raises(UsageError, match="leading or trailing whitespace") as refused:
        await links.link(conn, links.Link(key, "1", "email"))
    assert repr(key) in str(refused.value)
    assert await conn.fetchval("SELECT count(*) FROM syncd.segments") == 0


async def test_link_keeps_inner_whitespace(conn: Any) -> None:
    assert (await links.link(conn, links.Link("vip members", "1", "email"))).action == "linked"
    assert await conn.fetchval("SELECT segment_key FROM syncd.segments") == "vip members"


async def test_status_marks_inbox_keys_that_can_never_be_linked(conn: Any) -> None:
    await insert_changes(
        conn,
        [
            (" vip", "a@x.com", "add"),
            ("vip\u00a0", "b@x.com", "add"),
            ("later", "c@x.com", "add"),
        ],
    )
    text = report.status_text(await status.read(conn))
    lines = text.splitlines()
    flagged = [line for line in lines if "whitespace" in line]
    assert any("' vip'" in line for line in flagged), text
    assert any("'vip\\xa0'" in line for line in flagged), text
    later = [line for line in lines if line.startswith("later")]
    assert len(later) == 1 and "whitespace" not in later[0], text
