"""Acceptance: `syncd forget`, `forget --report`, `suppressions list/remove` as an operator
runs them, around whole syncs; and no identifier in any log line or output of any of it."""

from __future__ import annotations

from typing import Any

import pytest

from syncd.sandbox import RunningSandbox
from tests.helpers import CliResult, control, insert_changes, link_segment, run_cli, sha256

pytestmark = pytest.mark.timeout(90)

PERSON = " Jane.Doe@Example.com"
CANON = "jane.doe@example.com"
PREHASHED = sha256("pre.hashed@example.com")  # the CRM sent it hashed
PHONE = "+33 6 12 34 56 78"
IN_CLEAR = "6d92078a-8246-4ba4-ae5b-76104861e7dc"  # a madid: sent as it is


def secrets() -> list[str]:
    """Every form of every identifier the test writes: none may appear in any output."""
    return [
        CANON,
        sha256(CANON),
        PREHASHED,
        "33612345678",
        sha256("33612345678"),
        IN_CLEAR,
        "jane.doe",
    ]


def assert_nothing_personal(results: list[CliResult]) -> None:
    for result in results:
        text = result.output.lower()
        for value in secrets():
            assert value not in text, (value, result)


async def test_forget_report_and_suppressions_end_to_end_without_a_leak(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    await link_segment(env, sandbox, "rm", "1001")
    await link_segment(env, sandbox, "phones", "1002", "phoneNumber")
    env = {**env, "SYNCD_LOG_LEVEL": "debug", "SYNCD_LOG_FORMAT": "json"}
    await control(
        sandbox,
        "POST",
        "segments",
        {"api": "marketing-solutions", "identifier_type": "email", "account_id": "7", "id": "9"},
    )
    linked = await run_cli(
        env,
        *("segments", "link", "ms", "--segment-id", "9", "--identifier-type", "email"),
        *("--api", "marketing-solutions", "--account-id", "7"),
    )
    await control(
        sandbox,
        "POST",
        "segments",
        {"api": "marketing-solutions", "identifier_type": "madid", "account_id": "7", "id": "8"},
    )
    madids = await run_cli(
        env,
        *("segments", "link", "ads", "--segment-id", "8", "--identifier-type", "madid"),
        *("--api", "marketing-solutions", "--account-id", "7"),
    )
    await insert_changes(
        conn,
        [
            ("rm", PERSON, "add"),
            ("ms", PERSON, "add"),
            ("rm", PREHASHED, "add"),
            ("phones", PHONE, "add"),
            ("ads", IN_CLEAR.upper(), "add"),
            ("rm", "not an address", "add"),
        ],
    )
    first = await run_cli(env, "sync")
    assert first.code == 0, first
    assert sha256(CANON) in sandbox.state.segments["9"].members

    forgot = await run_cli(env, "forget", PERSON)
    assert forgot.code == 0, forgot
    assert "forgot that email (suppressed); a remove is queued for the next run in 2" in (
        forgot.stdout
    )
    lines = forgot.stdout.splitlines()
    assert any(line.split()[:2] == ["ms", "marketing-solutions"] for line in lines), forgot
    assert any(line.split()[:2] == ["rm", "retail-media"] for line in lines), forgot
    pending = await run_cli(env, "forget", "--report", "JANE.DOE@EXAMPLE.COM ")
    assert pending.code == 1, pending
    assert pending.stdout.count("pending: waits for the next run") == 2, pending

    await insert_changes(conn, [("rm", CANON, "add")])  # the CRM adds the person again
    second = await run_cli(env, "sync")
    assert second.code == 0, second
    assert "suppressed 1" in second.stdout, second
    assert sha256(CANON) not in sandbox.state.segments["1001"].members
    assert sha256(CANON) not in sandbox.state.segments["9"].members
    proof = await run_cli(env, "forget", "--report", PERSON)
    assert proof.code == 0, proof
    assert proof.stdout.count("(Criteo request date)") == 2, proof

    forgot_madid = await run_cli(
        env, "forget", IN_CLEAR, "--identifier-type", "madid", "--reason", "GDPR art. 17"
    )
    assert forgot_madid.code == 0, forgot_madid
    third = await run_cli(env, "sync")
    assert third.code == 0, third
    assert sandbox.state.segments["8"].members == set()

    listed = await run_cli(env, "suppressions", "list")
    assert listed.code == 0, listed
    assert "2 suppression(s)" in listed.stdout and "GDPR art. 17" in listed.stdout, listed
    status = await run_cli(env, "status")
    assert status.code == 0 and "suppressed" in status.stdout, status
    removed = await run_cli(env, "suppressions", "remove", PERSON)
    assert removed.code == 0, removed
    again = await run_cli(env, "suppressions", "remove", PERSON)
    assert again.code == 1, again
    bad = await run_cli(env, "forget", "jane.doe.example.com")
    assert bad.code == 2 and "not a valid email identifier (not_an_email)" in bad.stderr, bad
    unknown = await run_cli(env, "forget", PERSON, "--identifier-type", "shoe")
    assert unknown.code == 2, unknown

    # Item 4: every log line (debug included) and every output of every command above.
    assert_nothing_personal(
        [
            linked,
            madids,
            first,
            forgot,
            pending,
            second,
            proof,
            forgot_madid,
            third,
            listed,
            status,
            removed,
            again,
            bad,
            unknown,
        ]
    )
    assert '"event": "identifiers_forgotten"' in forgot.stdout, forgot
