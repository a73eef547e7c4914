"""`syncd segments create / search / rename / delete / stats`, the real CLI against the
sandbox: Criteo first, the local record only once Criteo confirmed."""

from __future__ import annotations

from typing import Any

from syncd import plan
from syncd.sandbox import RunningSandbox, SandboxConfig, start_sandbox
from tests.helpers import insert_changes, run_cli

ACCOUNT = "42"


async def links(conn: Any) -> dict[str, str]:
    rows = await conn.fetch("SELECT segment_key, criteo_segment_id FROM syncd.segments")
    return {r["segment_key"]: r["criteo_segment_id"] for r in rows}


async def create(env: dict[str, str], key: str, name: str, *extra: str) -> Any:
    return await run_cli(
        env, "segments", "create", key, "--name", name, "--identifier-type", "email", *extra
    )


async def create_vip(env: dict[str, str], conn: Any) -> str:
    """Create and link the Retail Media segment of key vip; its Criteo id."""
    result = await create(env, "vip", "VIP", "--account-id", ACCOUNT, "--retailer-id", "7")
    assert result.code == 0, result
    return (await links(conn))["vip"]


async def test_create_makes_the_segment_and_links_it_in_one_step(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    rm = await create(env, "vip", "VIP", "--account-id", ACCOUNT, "--retailer-id", "7")
    assert rm.code == 0, rm
    ms = await create(env, "app", "App users", "--advertiser-id", "4949")
    assert ms.code == 0, ms
    linked = await links(conn)
    rm_segment = sandbox.state.segments[linked["vip"]]
    assert (rm_segment.api, rm_segment.name, rm_segment.identifier_type) == (
        "retail-media",
        "VIP",
        "Email",
    )
    assert (rm_segment.account_id, rm_segment.retailer_id) == (ACCOUNT, "7")
    ms_segment = sandbox.state.segments[linked["app"]]
    assert (ms_segment.api, ms_segment.account_id) == ("marketing-solutions", "4949")
    assert f"created retail-media segment {rm_segment.id} 'VIP'" in rm.stdout


async def test_a_refused_create_links_nothing_and_says_why(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    sandbox.state.add_segment("retail-media", ACCOUNT, "Email", name="VIP")
    result = await create(env, "vip", "vip", "--account-id", ACCOUNT, "--retailer-id", "7")
    assert result.code == 1, result
    assert "name-must-be-unique" in result.stderr and "Traceback" not in result.output
    assert await links(conn) == {}
    assert len(sandbox.state.segments) == 1


async def test_create_refuses_what_it_can_see_is_wrong_before_calling_criteo(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await create_vip(env, conn)
    again = await create(env, "vip", "VIP 2", "--account-id", ACCOUNT, "--retailer-id", "7")
    assert again.code == 2 and "linked already" in again.stderr, again
    no_retailer = await create(env, "other", "Other", "--account-id", ACCOUNT)
    assert no_retailer.code == 2 and "--retailer-id" in no_retailer.stderr, no_retailer
    wrong = await run_cli(
        env, "segments", "create", "x", "--name", "X", "--identifier-type", "fax",
        "--advertiser-id", "4949",
    )  # fmt: skip
    assert wrong.code == 2, wrong
    assert len(sandbox.state.segments) == 1  # only the first create reached Criteo


async def test_search_reads_every_page_and_shows_which_are_linked(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    for n in range(501):  # Retail Media pages hold at most 500
        sandbox.state.add_segment("retail-media", ACCOUNT, "Email", name=f"rm {n:03d}")
    for n in range(101):  # Marketing Solutions pages at most 100
        sandbox.state.add_segment("marketing-solutions", "4949", None, name=f"ms {n:03d}")
    ui_made = sandbox.state.add_segment("retail-media", ACCOUNT, "Email", name="from the UI")
    ui_made.read_only = True
    linked = await run_cli(
        env, "segments", "link", "vip", "--segment-id", ui_made.id, "--identifier-type", "email",
        "--account-id", ACCOUNT,
    )  # fmt: skip
    assert linked.code == 0, linked
    rm = await run_cli(env, "segments", "search", "--account-id", ACCOUNT)
    assert rm.code == 0, rm
    assert "rm 000" in rm.stdout and "rm 500" in rm.stdout
    ui_line = next(line for line in rm.stdout.splitlines() if "from the UI" in line)
    assert ui_line.split()[-2:] == ["yes", "vip"]  # read-only, linked to vip
    ms = await run_cli(env, "segments", "search", "--advertiser-id", "4949", "--name", "MS 10")
    assert ms.code == 0, ms
    names = [line for line in ms.stdout.splitlines() if " ms " in f" {line} "]
    assert len(names) == 1 and "ms 100" in names[0], ms.stdout
    requests = sandbox.state.stats()["requests"]
    assert requests["rm_search"]["200"] == 2 and requests["ms_search"]["200"] == 2


async def test_rename_and_delete_go_through_criteo_first(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    segment_id = await create_vip(env, conn)
    renamed = await run_cli(env, "segments", "rename", "vip", "--name", "VIP 2026")
    assert renamed.code == 0, renamed
    assert sandbox.state.segments[segment_id].name == "VIP 2026"

    sandbox.state.segments[segment_id].in_use = True
    refused = await run_cli(env, "segments", "delete", "vip")
    assert refused.code == 1 and "segment-must-not-be-used-in-audience" in refused.stderr
    assert await links(conn) == {"vip": segment_id}  # nothing unlinked

    sandbox.state.segments[segment_id].in_use = False
    await insert_changes(conn, [("vip", "a@example.com", "add")])
    assert (await run_cli(env, "sync")).code == 0  # its chunk acknowledged: nothing open
    deleted = await run_cli(env, "segments", "delete", "vip")
    assert deleted.code == 0, deleted
    assert await links(conn) == {} and segment_id not in sandbox.state.segments


async def test_delete_refuses_while_chunks_are_open_unless_forced(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    segment_id = await create_vip(env, conn)
    await insert_changes(conn, [("vip", "a@example.com", "add")])
    run_id = await conn.fetchval(
        "INSERT INTO syncd.sync_runs (host, pid, target_window) VALUES ('t', 1, now()) RETURNING id"
    )
    await plan.plan_segment(conn, run_id, "vip", 50_000)  # one chunk, not sent
    refused = await run_cli(env, "segments", "delete", "vip")
    assert refused.code == 2 and "1 chunk(s) not yet acknowledged" in refused.stderr, refused
    assert segment_id in sandbox.state.segments
    forced = await run_cli(env, "segments", "delete", "vip", "--force")
    assert forced.code == 0 and "dropped 1 unsent chunk(s)" in forced.stdout, forced
    assert segment_id not in sandbox.state.segments
    assert await conn.fetchval("SELECT count(*) FROM syncd.chunks WHERE state <> 'done'") == 0


async def test_stats_for_both_apis_recorded_per_reading(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await create_vip(env, conn)
    assert (await create(env, "app", "App", "--advertiser-id", "4949")).code == 0
    assert (await create(env, "old", "Old", "--advertiser-id", "4949")).code == 0
    linked = await links(conn)
    sandbox.state.segments[linked["vip"]].members.update({"a" * 64, "b" * 64})
    sandbox.state.segments[linked["old"]].statistics_supported = False
    result = await run_cli(env, "segments", "stats")
    assert result.code == 0, result
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[2:]}
    assert lines["vip"].split()[3:] == ["2", "1", "50.0%"]
    assert lines["app"].split()[3] == "0"
    assert "not supported" in lines["old"]
    one = await run_cli(env, "segments", "stats", "vip")
    assert one.code == 0 and "app" not in one.stdout
    rows = await conn.fetch(
        "SELECT segment_key, supported, number_of_identifiers FROM syncd.segment_stats ORDER BY id"
    )
    assert [(r["segment_key"], r["supported"], r["number_of_identifiers"]) for r in rows] == [
        ("app", True, 0),
        ("old", False, None),
        ("vip", True, 2),
        ("vip", True, 2),
    ]


async def test_each_command_speaks_for_the_links_app(conn: Any, env: dict[str, str]) -> None:
    """Only brand_b's credentials work here: create --app brand_b, then rename, stats and
    delete of that link succeed (they use its app); the default app is refused."""
    brand_b = {
        "CRITEO_APPS": "brand_b",
        "CRITEO_APP_BRAND_B_CLIENT_ID": "brand-b-id",
        "CRITEO_APP_BRAND_B_CLIENT_SECRET": "brand-b-secret",
        "CRITEO_CLIENT_SECRET": "not-the-default-apps-secret",
    }
    config = SandboxConfig(clients=(("brand-b-id", "brand-b-secret"),))
    async with await start_sandbox(config) as sandbox:
        both = {**env, **brand_b, "CRITEO_API_URL": sandbox.url}
        made = await create(both, "vip", "VIP", "--advertiser-id", "4949", "--app", "brand_b")
        assert made.code == 0, made
        assert (await run_cli(both, "segments", "rename", "vip", "--name", "VIP 2")).code == 0
        assert (await run_cli(both, "segments", "stats", "vip")).code == 0
        assert (await run_cli(both, "segments", "delete", "vip")).code == 0
        refused = await create(both, "other", "Other", "--advertiser-id", "4949")
        assert refused.code != 0 and "CRITEO_CLIENT_SECRET" in refused.stderr, refused
        unknown = await create(both, "x", "X", "--advertiser-id", "4949", "--app", "nope")
        assert unknown.code == 2 and "'nope'" in unknown.stderr, unknown


async def test_stats_go_on_past_a_segment_criteo_refuses_and_exit_1(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await create_vip(env, conn)
    linked = await run_cli(
        env, "segments", "link", "gone", "--segment-id", "999", "--identifier-type", "email",
        "--account-id", ACCOUNT,
    )  # fmt: skip
    assert linked.code == 0, linked
    result = await run_cli(env, "segments", "stats")
    assert result.code == 1, result
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[2:]}
    assert "failed: segment-not-found" in lines["gone"]
    assert lines["vip"].split()[3] == "0"  # read all the same


async def test_segment_commands_draw_on_the_apps_shared_budget(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """Management calls share the app's budget with the pushes of every process."""
    await create_vip(env, conn)  # one create call
    assert (await run_cli(env, "segments", "stats")).code == 0  # one statistics call
    calls = await conn.fetchval("SELECT calls FROM syncd.app_budgets WHERE app = 'default'")
    assert calls == 2
