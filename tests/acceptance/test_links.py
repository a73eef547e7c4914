"""Acceptance: `syncd segments link / unlink` as an operator runs them, and where the
chunks then go: Marketing Solutions with gum identifiers end to end, re-pointing with
chunks open, a changed identifier type, unlinking with and without --force."""

from __future__ import annotations

from typing import Any

import pytest

from syncd.sandbox import RunningSandbox
from tests.helpers import Change, control, insert_changes, link_segment, members, run_cli

pytestmark = pytest.mark.timeout(60)


def usage_error(result: Any, *needles: str) -> None:
    """Exit 2 and one clear line naming the problem: never an unexpected error."""
    assert result.code == 2, result
    assert "unexpected error" not in result.output and "Traceback" not in result.output, result
    for needle in needles:
        assert needle in result.stderr, result


async def test_marketing_solutions_gum_link_is_sent_with_its_gum_caller_id(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    """A PATCH with gumCallerId through the product's own path: link, sync, and the
    sandbox's log and syncd's audit both show where the request went."""
    await control(
        sandbox,
        "POST",
        "segments",
        {"api": "marketing-solutions", "identifier_type": "gum", "account_id": "7", "id": "900"},
    )
    linked = await run_cli(
        env,
        *("segments", "link", "fans", "--segment-id", "900", "--identifier-type", "gum"),
        *("--api", "marketing-solutions", "--gum-caller-id", "4242", "--account-id", "7"),
    )
    assert linked.code == 0, linked
    assert linked.stdout.strip() == "linked fans -> marketing-solutions segment 900"
    changes: list[Change] = [("fans", f" gum-{i} ", "add") for i in range(3)]
    changes.append(("fans", "gum-0", "remove"))
    await insert_changes(conn, changes)

    result = await run_cli(env, "sync")
    assert result.code == 0, result
    assert members(sandbox, "900") == {"gum-1", "gum-2"}
    sent = sorted(
        (e["method"], e["operation"], e["identifier_type"], e["gum_caller_id"], e["count"])
        for e in sandbox.state.log
    )
    assert sent == [("PATCH", "add", "gum", 4242, 2), ("PATCH", "remove", "gum", 4242, 1)]
    rows = await conn.fetch(
        "SELECT api, criteo_segment_id, identifier_type, gum_caller_id, outcome,"
        " identifiers_sent, nb_valid_identifiers FROM syncd.push_audit ORDER BY operation"
    )
    assert [tuple(r.values()) for r in rows] == [
        ("marketing-solutions", "900", "gum", 4242, "acknowledged", 2, 2),
        ("marketing-solutions", "900", "gum", 4242, "acknowledged", 1, 1),
    ]


async def one_failed_chunk(env: dict[str, str], conn: Any, sandbox: RunningSandbox) -> None:
    """`vip` linked to segment 1001 with one chunk left open (Criteo refused it once)."""
    await link_segment(env, sandbox, "vip", "1001")
    await insert_changes(conn, [("vip", "a@example.com", "add"), ("vip", "b@example.com", "add")])
    await control(sandbox, "POST", "faults", {"script": [{"status": 400, "code": "nope"}]})
    result = await run_cli(env, "sync")
    assert result.code == 1, result
    assert await conn.fetchval("SELECT count(*) FROM syncd.chunks WHERE state = 'failed'") == 1


async def test_relinking_and_repointing_with_open_chunks(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    await one_failed_chunk(env, conn, sandbox)
    link_args = ("segments", "link", "vip", "--identifier-type", "email", "--segment-id")
    same = await run_cli(env, *link_args, "1001")
    assert (same.code, same.stdout.strip()) == (0, "vip already links to retail-media segment 1001")

    await control(
        sandbox,
        "POST",
        "segments",
        {"api": "retail-media", "identifier_type": "email", "account_id": "42", "id": "1002"},
    )
    refused = await run_cli(env, *link_args, "1002")
    usage_error(refused, "1 chunk(s) not yet acknowledged", "retail-media segment 1001", "--force")
    assert await conn.fetchval("SELECT criteo_segment_id FROM syncd.segments") == "1001"

    forced = await run_cli(env, *link_args, "1002", "--force")
    assert forced.code == 0, forced
    assert forced.stdout.strip() == (
        "updated vip -> retail-media segment 1002; its 1 open chunk(s) still go to "
        "retail-media segment 1001, the target they were planned for "
        "(changes planned from now on go to the new target)"
    )
    await insert_changes(conn, [("vip", "c@example.com", "add")])
    result = await run_cli(env, "sync")
    assert result.code == 0, result
    assert len(members(sandbox, "1001")) == 2 and len(members(sandbox, "1002")) == 1
    audit = await conn.fetch("SELECT criteo_segment_id, outcome FROM syncd.push_audit ORDER BY id")
    assert [tuple(r.values()) for r in audit] == [
        ("1001", "failed"),
        ("1001", "acknowledged"),
        ("1002", "acknowledged"),
    ]


async def test_a_changed_identifier_type_is_refused(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    await link_segment(env, sandbox, "vip", "1001")
    for extra in ((), ("--force",)):
        result = await run_cli(
            env,
            *("segments", "link", "vip", "--segment-id", "1001"),
            *("--identifier-type", "phoneNumber", *extra),
        )
        usage_error(result, "linked with identifier type email", "syncd segments unlink vip")
    assert await conn.fetchval("SELECT identifier_type FROM syncd.segments") == "email"


async def test_unlink_with_open_chunks_needs_force(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    await one_failed_chunk(env, conn, sandbox)
    refused = await run_cli(env, "segments", "unlink", "vip")
    usage_error(refused, "1 chunk(s) not yet acknowledged", "--force")
    assert await conn.fetchval("SELECT count(*) FROM syncd.segments") == 1

    forced = await run_cli(env, "segments", "unlink", "vip", "--force")
    assert (forced.code, forced.stdout.strip()) == (0, "unlinked vip (dropped 1 unsent chunk(s))")
    listed = await run_cli(env, "segments", "list")
    assert listed.stdout.startswith("no segment is linked yet"), listed
    assert await conn.fetchval("SELECT count(*) FROM syncd.chunks WHERE state <> 'done'") == 0
    again = await run_cli(env, "segments", "unlink", "vip")
    usage_error(again, "'vip' is not linked")


GUM = ["--segment-id", "9", "--identifier-type", "gum", "--api", "marketing-solutions"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--segment-id", "١٢٣", "--identifier-type", "email"], "--segment-id"),
        (["--segment-id", "1²", "--identifier-type", "email"], "--segment-id"),
        (
            [*GUM, "--gum-caller-id", "2147483648"],
            "--gum-caller-id must be a positive 32-bit integer",
        ),
        (
            [*GUM, "--gum-caller-id", "0"],
            "--gum-caller-id must be a positive 32-bit integer",
        ),
        (
            [*GUM, "--gum-caller-id", "١٢"],
            "--gum-caller-id: must be a positive whole number",
        ),
        (
            [*GUM, "--gum-caller-id", "-5"],
            "--gum-caller-id: must be a positive whole number",
        ),
    ],
)
async def test_link_usage_mistakes_are_exit_2(
    env: dict[str, str], conn: Any, args: list[str], needle: str
) -> None:
    result = await run_cli(env, "segments", "link", "vip", *args)
    usage_error(result, needle)
    assert await conn.fetchval("SELECT count(*) FROM syncd.segments") == 0


APP_ENV = {
    "CRITEO_APPS": "brand_b",
    "CRITEO_APP_BRAND_B_CLIENT_ID": "brand-b-id",
    "CRITEO_APP_BRAND_B_CLIENT_SECRET": "brand-b-Secret-31",
}
LINK = ("segments", "link", "vip", "--segment-id", "1001", "--identifier-type", "email")


async def test_a_link_names_its_app_and_an_unknown_app_is_refused(
    env: dict[str, str], conn: Any
) -> None:
    both = {**env, **APP_ENV}
    unknown = await run_cli(both, *LINK, "--app", "brand_c")
    usage_error(unknown, "--app 'brand_c' is not a configured Criteo app", "brand_b")
    assert await conn.fetchval("SELECT count(*) FROM syncd.segments") == 0
    linked = await run_cli(both, *LINK, "--app", "brand_b")
    assert linked.code == 0 and "(app brand_b)" in linked.stdout, linked
    assert await conn.fetchval("SELECT app FROM syncd.segments") == "brand_b"
    default = await run_cli(
        both, "segments", "link", "other", "--segment-id", "7", "--identifier-type", "email"
    )
    assert default.code == 0, default
    assert await conn.fetchval("SELECT app FROM syncd.segments WHERE segment_key = 'other'") == (
        "default"
    )
    assert "brand-b-Secret-31" not in linked.output + unknown.output


async def test_bad_app_configuration_stops_any_command_with_exit_2(env: dict[str, str]) -> None:
    missing = {**env, **APP_ENV, "CRITEO_APP_BRAND_B_CLIENT_SECRET": ""}
    result = await run_cli(missing, "segments", "list")
    usage_error(result, "CRITEO_APP_BRAND_B_CLIENT_SECRET is not set")
    malformed = {**env, "CRITEO_APPS": "Brand B"}
    usage_error(await run_cli(malformed, "status"), "CRITEO_APPS: 'Brand B' is not an app name")
