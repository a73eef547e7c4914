"""Mirror segments through the CLI, as a user runs them: link, sync, the removal guard with
`syncd plan`, `syncd status` and `syncd approve`, and kill -9 in the middle of a mirror sync."""

from __future__ import annotations

import datetime as dt
import signal
from typing import Any

from syncd.sandbox import RunningSandbox
from tests.acceptance.test_cli import set_latency
from tests.helpers import Cli, control, members, one_line_error, run_cli, sha256, wait_until

SOURCE = (
    "CREATE SCHEMA crm; CREATE TABLE crm.customers (id int, email text, tier text);"
    "CREATE VIEW crm.vip_members AS SELECT 'vip' AS segment_key, email AS identifier "
    "FROM crm.customers WHERE tier = 'vip'"
)


async def customers(conn: Any, first: int, last: int, tier: str = "vip") -> None:
    await conn.execute(
        "INSERT INTO crm.customers SELECT g, 'c' || g || '@example.com', $3 "
        "FROM generate_series($1::int, $2::int) g",
        first,
        last,
        tier,
    )


def hashed(first: int, last: int) -> set[str]:
    return {sha256(f"c{n}@example.com") for n in range(first, last + 1)}


def killable(env: dict[str, str]) -> dict[str, str]:
    """Chunks of 100 sent one at a time; a 2 s HTTP timeout frees a killed run's claims
    5 s after its last heartbeat."""
    return env | {
        "SYNCD_CHUNK_SIZE": "100",
        "SYNCD_CONCURRENCY": "1",
        "SYNCD_HTTP_TIMEOUT_S": "2",
        "SYNCD_LEASE_S": "30",
    }


async def mirror_link(env: dict[str, str], sandbox: RunningSandbox, conn: Any) -> None:
    await conn.execute(SOURCE)
    await control(
        sandbox,
        "POST",
        "segments",
        {"api": "retail-media", "identifier_type": "email", "account_id": "42", "id": "1000"},
    )
    linked = await run_cli(
        env, "segments", "link", "vip", "--segment-id", "1000", "--identifier-type", "email",
        "--mirror", "crm.vip_members",
    )  # fmt: skip
    assert linked.code == 0, linked
    assert (
        linked.stdout.strip()
        == "linked vip -> retail-media segment 1000, mirroring crm.vip_members"
    )


async def test_a_mirror_through_the_cli_with_the_guard_and_approval(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    await mirror_link(env, sandbox, conn)
    missing = await run_cli(
        env, "segments", "link", "x", "--segment-id", "1", "--identifier-type", "email",
        "--mirror", "crm.nope",
    )  # fmt: skip
    one_line_error(missing, 2, "--mirror relation crm.nope does not exist")

    await customers(conn, 1, 300)
    assert (await run_cli(env, "sync")).code == 0
    assert members(sandbox, "1000") == hashed(1, 300)

    await conn.execute("UPDATE crm.customers SET tier = 'lapsed' WHERE id > 100")  # a bad deploy
    blocked = await run_cli(env, "sync")
    assert blocked.code == 1, blocked
    assert "blocked by the mass-removal guard (vip)" in blocked.stderr + blocked.stdout
    assert members(sandbox, "1000") == hashed(1, 300)
    preview = await run_cli(env, "plan")
    assert "BLOCKED: removes 200 of 300" in preview.stdout, preview.stdout
    status = await run_cli(env, "status")
    assert "BLOCKED by the mass-removal guard" in status.stdout, status.stdout
    assert "200 of 300" in status.stdout

    approved = await run_cli(env, "approve", "vip")
    assert approved.code == 0, approved
    assert "the next sync pushes the plan of vip" in approved.stdout
    assert (await run_cli(env, "sync")).code == 0
    assert members(sandbox, "1000") == hashed(1, 100)
    again = await run_cli(env, "approve", "vip")
    one_line_error(again, 2, "'vip' has no blocked plan")


async def test_kill_9_in_the_middle_of_a_mirror_sync_then_the_list_is_exact(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    env = killable(env)
    await mirror_link(env, sandbox, conn)
    await customers(conn, 1, 1000)
    await set_latency(sandbox, 400)
    first = await Cli.start(env, "sync")

    async def some_acknowledged() -> bool:
        n = await conn.fetchval(
            "SELECT count(*) FROM syncd.push_audit WHERE outcome = 'acknowledged'"
        )
        return bool(n >= 2)

    await wait_until(some_acknowledged, 20, "two acknowledged chunks")
    first.signal(signal.SIGKILL)
    assert (await first.finish(10)).code == -signal.SIGKILL
    assert len(members(sandbox, "1000")) < 1000

    # The source moves on meanwhile: the next diff starts from what is on its way.
    await conn.execute("DELETE FROM crm.customers WHERE id <= 50")
    await customers(conn, 1001, 1050)
    await set_latency(sandbox, 0)
    second = await run_cli(env, "sync")
    assert second.code == 0, second
    assert members(sandbox, "1000") == hashed(51, 1050)
    third = await run_cli(env, "sync")  # nothing left to do
    assert third.code == 0
    sent = await conn.fetchval(
        "SELECT count(*) FROM syncd.push_audit a JOIN syncd.sync_runs r ON r.id = a.run_id "
        "WHERE r.id = (SELECT max(id) FROM syncd.sync_runs)"
    )
    assert sent == 0


async def test_kill_9_in_the_middle_of_a_resync_then_the_list_is_exact(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    env = killable(env)
    await mirror_link(env, sandbox, conn)
    await customers(conn, 1, 1000)
    assert (await run_cli(env, "sync")).code == 0
    sandbox.state.segments["1000"].members.add("drifted")  # edited on Criteo's side

    # A window 1 h from now whatever the time: refused, and said so; then forced.
    soon = f"{(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)):%H:%M}"
    refused = await run_cli({**env, "SYNCD_WINDOWS_UTC": soon}, "resync", "vip")
    one_line_error(refused, 2, "resync of 'vip' refused: the next window is", "--force")
    queued = await run_cli({**env, "SYNCD_WINDOWS_UTC": soon}, "resync", "vip", "--force")
    assert queued.code == 0, queued
    assert "a clear, then 1,000 member(s) in 10 chunk(s)" in queued.stdout

    await set_latency(sandbox, 400)
    first = await Cli.start(env, "sync")

    async def cleared_and_some_added() -> bool:
        ops = await conn.fetch(
            "SELECT operation FROM syncd.push_audit WHERE outcome = 'acknowledged' "
            "AND run_id = (SELECT max(run_id) FROM syncd.push_audit)"
        )
        done = [r["operation"] for r in ops]
        return "clear" in done and done.count("add") >= 2

    await wait_until(cleared_and_some_added, 30, "the clear and two adds acknowledged")
    first.signal(signal.SIGKILL)
    assert (await first.finish(10)).code == -signal.SIGKILL
    assert 0 < len(members(sandbox, "1000")) < 1000  # the list is half rebuilt

    await set_latency(sandbox, 0)
    second = await run_cli(env, "sync")
    assert second.code == 0, second
    assert members(sandbox, "1000") == hashed(1, 1000)
    clears = await conn.fetchval("SELECT count(*) FROM syncd.push_audit WHERE operation = 'clear'")
    assert clears == 1  # never cleared again after the crash
