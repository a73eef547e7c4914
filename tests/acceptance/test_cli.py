"""Acceptance: the real `syncd` command in a subprocess, a real PostgreSQL, the sandbox on loopback.

Each test drives `python -m syncd ...` the way an operator or a timer would, then checks
what ended up where it matters: rows in syncd.chunks / push_audit / sync_runs, and the
members and request log of the sandbox standing in for Criteo.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from syncd.db import migrations as db
from syncd.db import query
from syncd.sandbox import RunningSandbox
from tests.helpers import (
    Change,
    Cli,
    control,
    expected_members,
    insert_changes,
    link_segment,
    members,
    one_line_error,
    run_cli,
    sha256,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def emails(prefix: str, count: int, start: int = 0) -> Iterator[str]:
    return (f"{prefix}{i}@example.com" for i in range(start, start + count))


def amendment_log(sandbox: RunningSandbox) -> list[dict[str, Any]]:
    return list(sandbox.state.log)


def requests_by_key(sandbox: RunningSandbox) -> Counter[str]:
    return Counter(entry["idempotency_key"] for entry in sandbox.state.log)


async def audit(conn: Any) -> list[Any]:
    return list(await conn.fetch("SELECT * FROM syncd.push_audit ORDER BY id"))


async def chunk_states(conn: Any) -> Counter[str]:
    rows = await conn.fetch("SELECT state, count(*) AS n FROM syncd.chunks GROUP BY state")
    return Counter({r["state"]: r["n"] for r in rows})


async def acknowledged_per_chunk(conn: Any) -> dict[int, int]:
    rows = await conn.fetch(
        "SELECT c.id, count(a.id) FILTER (WHERE a.outcome = 'acknowledged') AS acks "
        "FROM syncd.chunks c LEFT JOIN syncd.push_audit a ON a.chunk_id = c.id "
        "GROUP BY c.id ORDER BY c.id"
    )
    return {r["id"]: r["acks"] for r in rows}


async def assert_every_chunk_acknowledged_once(conn: Any, chunks: int) -> None:
    """All `chunks` chunks are done, and the audit acknowledges each exactly once."""
    assert await chunk_states(conn) == {"done": chunks}
    acks = await acknowledged_per_chunk(conn)
    assert len(acks) == chunks and set(acks.values()) == {1}, acks


async def run_statuses(conn: Any) -> list[str]:
    return [r["status"] for r in await conn.fetch("SELECT status FROM syncd.sync_runs ORDER BY id")]


async def set_latency(sandbox: RunningSandbox, ms: float) -> None:
    await control(sandbox, "POST", "faults", {"latency_ms": ms})


# --- 1. happy path --------------------------------------------------------------------------------


async def test_happy_path_from_an_empty_database(
    env: dict[str, str], empty_database_url: str, sandbox: RunningSandbox
) -> None:
    env = {**env, "SYNCD_DATABASE_URL": empty_database_url, "SYNCD_CHUNK_SIZE": "50000"}
    first = await run_cli(env, "migrate")
    assert (first.code, first.stdout.strip()) == (
        0,
        "applied " + ", ".join(m.name for m in db.load_migrations()),
    ), first
    second = await run_cli(env, "migrate")
    assert (second.code, second.stdout.strip()) == (0, "schema is up to date"), second

    await link_segment(env, sandbox, "vip", "1001")
    changes: list[Change] = [("vip", f" User{i}@Example.COM ", "add") for i in range(115_000)]
    changes += [("vip", e, "remove") for e in emails("user", 5_000)]
    changes.append(("vip", "not-an-email", "add"))
    assert len(changes) == 120_001
    conn = await asyncpg.connect(empty_database_url)
    try:
        await insert_changes(conn, changes)

        result = await run_cli(env, "sync")
        assert result.code == 0, result
        assert "run 1: succeeded" in result.stdout, result
        assert (
            "changes 120,001 · rejected 1 · suppressed 0 · chunks planned 4 · acknowledged 4 · "
            "failed 0 · left 0 · requests 4" in result.stdout
        ), result

        rows = await audit(conn)
        assert [r["outcome"] for r in rows] == ["acknowledged"] * 4
        assert len({r["chunk_id"] for r in rows}) == 4
        for r in rows:
            assert r["nb_valid_identifiers"] == r["identifiers_sent"], dict(r)
            assert r["nb_invalid_identifiers"] == 0
            assert r["http_status"] == 200
            assert r["attempts"] == 1
            assert r["identifiers_sent"] <= 50_000
        sent = Counter()
        for r in rows:
            sent[r["operation"]] += r["identifiers_sent"]
        assert sent == {"add": 110_000, "remove": 5_000}
        assert await chunk_states(conn) == {"done": 4}
        assert await conn.fetchval("SELECT count(*) FROM syncd.membership_changes") == 0
        rejected = await conn.fetch("SELECT identifier, reason FROM syncd.rejected_identifiers")
        assert [tuple(r) for r in rejected] == [("not-an-email", "not_an_email")]
        run = await conn.fetchrow("SELECT * FROM syncd.sync_runs")
        assert run["status"] == "succeeded"
        assert (run["changes_consumed"], run["chunks_acknowledged"]) == (120_001, 4)
        assert run["nb_valid_identifiers"] == 115_000

        want = expected_members(changes, "vip")
        assert len(want) == 110_000
        assert members(sandbox, "1001") == want

        requests_before = len(sandbox.state.log)
        assert requests_before == 4
        again = await run_cli(env, "sync")
        assert again.code == 0, again
        assert "nothing to send" in again.stdout, again
        assert len(sandbox.state.log) == requests_before
        assert len(await audit(conn)) == 4
        assert await run_statuses(conn) == ["succeeded", "succeeded"]
    finally:
        await conn.close()


# --- 2. netting -----------------------------------------------------------------------------------


async def test_add_then_remove_of_the_same_address_nets_to_one_remove(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    await link_segment(env, sandbox, "vip", "1001")
    # Already in the segment at Criteo: the remove must take exactly this value out.
    sandbox.state.segments["1001"].members.update({sha256("a@x.com"), sha256("other@x.com")})
    await insert_changes(conn, [("vip", "A@x.com ", "add"), ("vip", "a@x.com", "remove")])

    result = await run_cli(env, "sync")
    assert result.code == 0, result

    log = amendment_log(sandbox)
    assert [(e["operation"], e["count"], e["status"]) for e in log] == [("remove", 1, 200)]
    assert members(sandbox, "1001") == {sha256("other@x.com")}
    rows = await audit(conn)
    assert [(r["operation"], r["identifiers_sent"], r["nb_valid_identifiers"]) for r in rows] == [
        ("remove", 1, 1)
    ]
    chunks = await conn.fetch("SELECT operation, identifier_count FROM syncd.chunks")
    assert [tuple(c) for c in chunks] == [("remove", 1)]


# --- 3. bad configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "change", "variable"),
    [
        ("sync", {"SYNCD_DATABASE_URL": None}, "SYNCD_DATABASE_URL"),
        ("status", {"SYNCD_DATABASE_URL": None}, "SYNCD_DATABASE_URL"),
        ("sync", {"SYNCD_CONCURRENCY": "abc"}, "SYNCD_CONCURRENCY"),
        ("sync", {"SYNCD_CHUNK_SIZE": "60000"}, "SYNCD_CHUNK_SIZE"),
        ("sync", {"CRITEO_API_URL": "ftp://x"}, "CRITEO_API_URL"),
        ("sync", {"CRITEO_CLIENT_SECRET": None}, "CRITEO_CLIENT_SECRET"),
        # The database password must not be echoed either (an unreachable database is
        # not configuration: tests/acceptance/test_configuration.py).
        ("migrate", {"SYNCD_DATABASE_URL": "mysql://u:hunter2pw@db/crm"}, "SYNCD_DATABASE_URL"),
    ],
)
async def test_bad_configuration_is_one_line_and_exit_2(
    env: dict[str, str], command: str, change: dict[str, str | None], variable: str
) -> None:
    bad = {k: v for k, v in {**env, **change}.items() if v is not None}
    result = await run_cli(bad, command)
    one_line_error(result, 2, variable)
    assert result.stdout == "", result
    assert "sandbox-secret" not in result.output
    assert "hunter2pw" not in result.output


async def test_refused_secret_stops_the_run_and_never_shows(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    secret = "wrong-Secret-7f3a9c"
    await link_segment(env, sandbox, "vip", "1001")
    await insert_changes(conn, [("vip", "a@x.com", "add")])
    result = await run_cli(
        {**env, "CRITEO_CLIENT_SECRET": secret, "SYNCD_LOG_LEVEL": "debug"}, "sync"
    )
    assert result.code == 2, result
    assert secret not in result.output
    assert "CRITEO_CLIENT_SECRET" in result.output, result
    assert "Traceback" not in result.output, result
    assert await chunk_states(conn) == {"pending": 1}
    assert sandbox.state.amendments_applied == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--identifier-type", "fax"], "unknown identifier type 'fax'"),
        (["--identifier-type", "email", "--api", "tiktok"], "unknown API 'tiktok'"),
        (
            ["--identifier-type", "gum", "--api", "retail-media", "--gum-caller-id", "7"],
            "does not accept identifier type 'gum'",
        ),
        (["--identifier-type", "gum", "--api", "retail-media"], "gum"),
    ],
)
async def test_segments_link_refuses_what_criteo_cannot_serve(
    env: dict[str, str], conn: Any, args: list[str], needle: str
) -> None:
    result = await run_cli(env, "segments", "link", "vip", "--segment-id", "1001", *args)
    one_line_error(result, 2, needle)
    assert await conn.fetchval("SELECT count(*) FROM syncd.segments") == 0


# --- 4. unlinked keys wait ------------------------------------------------------------------------


async def test_changes_of_an_unlinked_key_wait_for_the_link(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    await link_segment(env, sandbox, "vip", "1001")
    changes: list[Change] = [("vip", e, "add") for e in emails("v", 2)]
    changes += [("later", e, "add") for e in emails("l", 3)]
    await insert_changes(conn, changes)

    result = await run_cli(env, "sync")
    assert result.code == 0, result
    assert {e["segment_id"] for e in amendment_log(sandbox)} == {"1001"}
    assert members(sandbox, "1001") == expected_members(changes, "vip")
    waiting = await conn.fetch("SELECT segment_key FROM syncd.membership_changes")
    assert [r["segment_key"] for r in waiting] == ["later"] * 3

    status = await run_cli(env, "status")
    assert status.code == 0, status
    assert "changes waiting for a link (3 in 1 key(s)" in status.stdout, status.stdout
    later_lines = [line.split() for line in status.stdout.splitlines() if line.startswith("later")]
    assert len(later_lines) == 1 and later_lines[0][1] == "3", status.stdout

    await link_segment(env, sandbox, "later", "1002")
    result = await run_cli(env, "sync")
    assert result.code == 0, result
    assert members(sandbox, "1002") == expected_members(changes, "later")
    assert len(members(sandbox, "1002")) == 3
    assert await conn.fetchval("SELECT count(*) FROM syncd.membership_changes") == 0
    status = await run_cli(env, "status")
    assert "waiting for a link" not in status.stdout, status.stdout


# --- 5. kill -9 mid-run ---------------------------------------------------------------------------


async def test_kill_9_mid_run_then_the_next_run_finishes_without_resending(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    concurrency = 2
    env = {**env, "SYNCD_CHUNK_SIZE": "1000", "SYNCD_CONCURRENCY": str(concurrency)}
    # A 2 s HTTP timeout: the killed run's claims are free 5 s after its last heartbeat.
    env |= {"SYNCD_HTTP_TIMEOUT_S": "2", "SYNCD_LEASE_S": "30"}
    await link_segment(env, sandbox, "a", "1001")
    await link_segment(env, sandbox, "b", "1002")
    changes: list[Change] = [("a", e, "add") for e in emails("a", 10_000)]
    changes += [("b", e, "add") for e in emails("b", 9_500)]
    changes += [("b", e, "remove") for e in emails("b", 500)]  # net: 9,000 adds + 500 removes
    await insert_changes(conn, changes)
    await set_latency(sandbox, 600)

    first = await Cli.start(env, "sync")

    async def some_acknowledged() -> bool:
        n = await conn.fetchval(
            "SELECT count(*) FROM syncd.push_audit WHERE outcome = 'acknowledged'"
        )
        return bool(n >= 3)

    await wait_until(some_acknowledged, 20, "three acknowledged chunks")
    first.signal(signal.SIGKILL)
    killed = await first.finish(10)
    assert killed.code == -signal.SIGKILL
    total = await conn.fetchval("SELECT count(*) FROM syncd.chunks")
    assert total == 20
    assert sandbox.state.amendments_applied < total
    acked_before = {
        r["chunk_id"]
        for r in await conn.fetch(
            "SELECT chunk_id FROM syncd.push_audit WHERE outcome = 'acknowledged'"
        )
    }
    assert len(acked_before) >= 3

    await set_latency(sandbox, 0)
    second = await run_cli(env, "sync")
    assert second.code == 0, second

    async def sandbox_idle() -> bool:
        return sandbox.state.in_flight == 0

    await wait_until(sandbox_idle, 10, "the killed run's requests to drain")
    await assert_every_chunk_acknowledged_once(conn, total)
    assert members(sandbox, "1001") == expected_members(changes, "a")
    assert members(sandbox, "1002") == expected_members(changes, "b")

    sent = requests_by_key(sandbox)
    chunk_ids = {r["id"] for r in await conn.fetch("SELECT id FROM syncd.chunks")}
    assert set(sent) == {f"syncd-chunk-{i}" for i in chunk_ids}
    for chunk_id in acked_before:
        assert sent[f"syncd-chunk-{chunk_id}"] == 1, chunk_id
    resent = {key for key, n in sent.items() if n > 1}
    assert len(resent) <= concurrency, sent
    assert all(n <= 2 for n in sent.values()), sent
    assert await run_statuses(conn) == ["crashed", "succeeded"]
    # What the killed run had claimed went again only once none of its requests could
    # still be in flight: after its last heartbeat plus the bound it recorded.
    free_at = await conn.fetchval(
        "SELECT extract(epoch FROM heartbeat_at) + takeover_after_s FROM syncd.sync_runs "
        "WHERE status = 'crashed'"
    )
    for key in resent:
        _, second = sorted(e["at"] for e in amendment_log(sandbox) if e["idempotency_key"] == key)
        assert second >= float(free_at), (key, second, free_at)


# --- 6. two concurrent runs -----------------------------------------------------------------------


async def test_two_concurrent_runs_send_each_chunk_once(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    env = {**env, "SYNCD_CHUNK_SIZE": "100", "SYNCD_CONCURRENCY": "4"}
    await link_segment(env, sandbox, "a", "1001")
    await link_segment(env, sandbox, "b", "1002")
    changes: list[Change] = [("a", e, "add") for e in emails("a", 2_000)]
    changes += [("b", e, "add") for e in emails("b", 2_000)]
    await insert_changes(conn, changes)
    # 40 chunks of 300 ms at 4 at a time: one run alone needs 3 s, and an idle run looks
    # for work every 0.5 s, so both runs push once both are up. Both come up before any
    # chunk exists: the test holds both segments' plan locks until both runs wait on them.
    await set_latency(sandbox, 300)
    for key in ("a", "b"):
        await conn.execute(query("lock_segment_plan"), key)

    runs = await asyncio.gather(Cli.start(env, "sync"), Cli.start(env, "sync"))

    async def both_runs_wait_to_plan() -> bool:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return bool(waiting == 4)  # two runs, two segments each

    await wait_until(both_runs_wait_to_plan, 20, "both runs to wait for the plan locks")
    for key in ("a", "b"):
        await conn.execute(query("unlock_segment_plan"), key)
    results = await asyncio.gather(*(r.finish(45) for r in runs))
    for result in results:
        assert result.code == 0, result

    await assert_every_chunk_acknowledged_once(conn, 40)
    outcomes = Counter(r["outcome"] for r in await audit(conn))
    assert outcomes == {"acknowledged": 40}, outcomes
    chunk_ids = {r["id"] for r in await conn.fetch("SELECT id FROM syncd.chunks")}
    sent = requests_by_key(sandbox)
    assert sent == Counter({f"syncd-chunk-{i}": 1 for i in chunk_ids})
    assert {e["status"] for e in amendment_log(sandbox)} == {200}
    assert members(sandbox, "1001") == expected_members(changes, "a")
    assert members(sandbox, "1002") == expected_members(changes, "b")
    runs_rows = await conn.fetch(
        "SELECT id, status, chunks_acknowledged FROM syncd.sync_runs ORDER BY id"
    )
    assert [r["status"] for r in runs_rows] == ["succeeded", "succeeded"]
    assert sum(r["chunks_acknowledged"] for r in runs_rows) == 40
    # Both runs really worked: each acknowledged some of the chunks.
    assert all(r["chunks_acknowledged"] >= 1 for r in runs_rows), runs_rows
    by_run = Counter(r["run_id"] for r in await audit(conn) if r["outcome"] == "acknowledged")
    assert set(by_run) == {r["id"] for r in runs_rows}, by_run


# --- 7. order per segment across plans ------------------------------------------------------------


async def test_a_later_remove_waits_for_the_earlier_add(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    latency_s = 1.5
    await link_segment(env, sandbox, "vip", "1001")
    await insert_changes(conn, [("vip", "x@x.com", "add"), ("vip", "y@x.com", "add")])
    await set_latency(sandbox, latency_s * 1000)
    slow = await Cli.start(env, "sync")

    async def add_in_flight() -> bool:
        return sandbox.state.in_flight >= 1

    await wait_until(add_in_flight, 10, "the add to reach the sandbox")
    await set_latency(sandbox, 0)
    await insert_changes(conn, [("vip", "x@x.com", "remove")])
    fast = await Cli.start(env, "sync")
    results = await asyncio.gather(slow.finish(30), fast.finish(30))
    for result in results:
        assert result.code == 0, result

    plans = await conn.fetch("SELECT run_id, adds, removes FROM syncd.plans ORDER BY id")
    assert [(p["adds"], p["removes"]) for p in plans] == [(2, 0), (0, 1)]
    assert plans[0]["run_id"] != plans[1]["run_id"]
    assert members(sandbox, "1001") == {sha256("y@x.com")}
    log = amendment_log(sandbox)
    assert [(e["operation"], e["status"]) for e in log] == [("add", 200), ("remove", 200)]
    # The remove left syncd only after the add was answered (latency_s after it arrived).
    assert log[1]["at"] >= log[0]["at"] + latency_s - 0.05, log


# --- 8. late-committed changes --------------------------------------------------------------------


async def test_a_change_committed_late_is_sent_by_the_next_run(
    env: dict[str, str], conn: Any, database_url: str, sandbox: RunningSandbox
) -> None:
    await link_segment(env, sandbox, "vip", "1001")
    late_conn = await asyncpg.connect(database_url)
    other_conn = await asyncpg.connect(database_url)
    try:
        late_tx = late_conn.transaction()
        await late_tx.start()
        late_id = await late_conn.fetchval(
            "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
            "VALUES ('vip', 'late@x.com', 'add') RETURNING id"
        )
        early_id = await other_conn.fetchval(
            "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
            "VALUES ('vip', 'early@x.com', 'add') RETURNING id"
        )
        assert late_id < early_id

        result = await run_cli(env, "sync")
        assert result.code == 0, result
        assert members(sandbox, "1001") == {sha256("early@x.com")}
        assert [e["count"] for e in amendment_log(sandbox)] == [1]

        await late_tx.commit()
        assert await conn.fetchval("SELECT count(*) FROM syncd.membership_changes") == 1
        result = await run_cli(env, "sync")
        assert result.code == 0, result
        assert members(sandbox, "1001") == {sha256("early@x.com"), sha256("late@x.com")}
        assert [e["count"] for e in amendment_log(sandbox)] == [1, 1]
        assert await conn.fetchval("SELECT count(*) FROM syncd.membership_changes") == 0
    finally:
        await late_conn.close()
        await other_conn.close()


# --- 9. faults ------------------------------------------------------------------------------------


async def test_transient_faults_are_retried_to_completion(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    env = {
        **env,
        "SYNCD_CHUNK_SIZE": "10",
        "SYNCD_CONCURRENCY": "2",
        "SYNCD_MAX_ATTEMPTS": "10",
        "SYNCD_RETRY_BASE_S": "0.01",
    }
    await link_segment(env, sandbox, "vip", "1001")
    changes: list[Change] = [("vip", e, "add") for e in emails("u", 30)]
    await insert_changes(conn, changes)
    script = [{"status": 503}, {"status": 429, "retry_after": "1"}, {"drop": "after"}]
    script.append({"drop": "before"})
    await control(sandbox, "POST", "faults", {"script": script})

    result = await run_cli(env, "sync")
    assert result.code == 0, result
    assert result.elapsed_s >= 1.0

    assert members(sandbox, "1001") == expected_members(changes, "vip")
    rows = await audit(conn)
    assert [r["outcome"] for r in rows] == ["acknowledged"] * 3
    assert sum(r["attempts"] for r in rows) == 3 + len(script)
    assert max(r["attempts"] for r in rows) > 1
    log = amendment_log(sandbox)
    assert len(log) == 3 + len(script)
    assert sorted(e["fault"] for e in log if e["fault"]) == sorted(
        ["status_503", "status_429", "drop_after", "drop_before"]
    )
    # Every chunk whose request met a fault was retried, and the audit counts it.
    attempts = {f"syncd-chunk-{r['chunk_id']}": r["attempts"] for r in rows}
    assert attempts == dict(requests_by_key(sandbox))
    # Retry-After: 1 was honoured: the same chunk came back at least a second later.
    limited = next(e for e in log if e["fault"] == "status_429")
    key = limited["idempotency_key"]
    retry = next(e for e in log if e["idempotency_key"] == key and e["at"] > limited["at"])
    assert retry["at"] - limited["at"] >= 1.0, log


async def test_a_permanent_400_fails_the_chunk_and_the_next_run_retries_it(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    await link_segment(env, sandbox, "vip", "1001")
    await link_segment(env, sandbox, "gold", "1002")
    changes: list[Change] = [("vip", e, "add") for e in emails("v", 5)]
    changes += [("gold", e, "add") for e in emails("g", 4)]
    await insert_changes(conn, changes)
    await control(
        sandbox,
        "POST",
        "faults",
        {"script": [{"status": 400, "code": "some-code", "segment_id": "1002"}]},
    )

    result = await run_cli(env, "sync")
    assert result.code == 1, result
    rows = await audit(conn)
    by_segment = {r["segment_key"]: r for r in rows}
    assert len(rows) == 2
    assert by_segment["vip"]["outcome"] == "acknowledged"
    failed = by_segment["gold"]
    assert (failed["outcome"], failed["error_code"], failed["http_status"]) == (
        "failed",
        "some-code",
        400,
    )
    assert failed["attempts"] == 1
    assert members(sandbox, "1002") == set()
    assert await chunk_states(conn) == {"done": 1, "failed": 1}

    status = await run_cli(env, "status")
    assert status.code == 0, status
    assert "failed chunks" in status.stdout, status.stdout
    failed_lines = [
        line.split()
        for line in status.stdout.splitlines()
        if line.split()[:2] == [str(failed["chunk_id"]), "gold"]
    ]
    assert len(failed_lines) == 1, status.stdout
    assert "some-code" in status.stdout, status.stdout

    again = await run_cli(env, "sync")
    assert again.code == 0, again
    assert members(sandbox, "1002") == expected_members(changes, "gold")
    assert await chunk_states(conn) == {"done": 2}
    outcomes = [
        r["outcome"]
        for r in await conn.fetch(
            "SELECT outcome FROM syncd.push_audit WHERE chunk_id = $1 ORDER BY id",
            failed["chunk_id"],
        )
    ]
    assert outcomes == ["failed", "acknowledged"]
    assert await run_statuses(conn) == ["failed", "succeeded"]


# --- 10. token expiry -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["expire-tokens", "scripted-401"])
async def test_an_expired_token_is_fetched_again(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox, how: str
) -> None:
    env = {**env, "SYNCD_CHUNK_SIZE": "10", "SYNCD_CONCURRENCY": "1"}
    await link_segment(env, sandbox, "vip", "1001")
    changes: list[Change] = [("vip", e, "add") for e in emails("u", 40)]
    await insert_changes(conn, changes)
    if how == "scripted-401":
        await control(sandbox, "POST", "faults", {"script": [{"status": 401}]})
        result = await run_cli(env, "sync")
    else:
        await set_latency(sandbox, 300)
        run = await Cli.start(env, "sync")

        async def first_applied() -> bool:
            return sandbox.state.amendments_applied >= 1

        await wait_until(first_applied, 10, "the first amendment")
        await control(sandbox, "POST", "expire-tokens")
        result = await run.finish(30)
    assert result.code == 0, result

    stats = await control(sandbox, "GET", "stats")
    assert stats["token_requests"] >= 2, stats["token_requests"]
    assert stats["requests"]["rm_add_remove"].get("401", 0) >= 1, stats["requests"]
    assert members(sandbox, "1001") == expected_members(changes, "vip")
    await assert_every_chunk_acknowledged_once(conn, 4)


# --- 11. SIGTERM mid-run --------------------------------------------------------------------------


async def test_sigterm_stops_cleanly_and_releases_claims(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    env = {**env, "SYNCD_CHUNK_SIZE": "100", "SYNCD_CONCURRENCY": "2"}
    await link_segment(env, sandbox, "vip", "1001")
    changes: list[Change] = [("vip", e, "add") for e in emails("u", 2_000)]
    await insert_changes(conn, changes)
    await set_latency(sandbox, 700)
    run = await Cli.start(env, "sync")

    async def first_applied() -> bool:
        return sandbox.state.amendments_applied >= 1

    await wait_until(first_applied, 15, "the first amendment")
    signalled = time.monotonic()
    run.signal(signal.SIGTERM)
    stopped = await run.finish(15)
    assert time.monotonic() - signalled <= 5.0
    assert stopped.code == 1, stopped
    assert "interrupted" in stopped.stdout, stopped
    assert await run_statuses(conn) == ["interrupted"]
    states = await chunk_states(conn)
    assert "claimed" not in states, states
    assert states["pending"] >= 1 and sum(states.values()) == 20, states
    assert (
        await conn.fetchval("SELECT count(*) FROM syncd.chunks WHERE owner_run_id IS NOT NULL") == 0
    )

    await set_latency(sandbox, 0)
    again = await run_cli(env, "sync")
    assert again.code == 0, again
    await assert_every_chunk_acknowledged_once(conn, 20)
    assert members(sandbox, "1001") == expected_members(changes, "vip")
    assert await run_statuses(conn) == ["interrupted", "succeeded"]


async def test_sigterm_during_a_retry_wait_stops_at_once(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    env = {**env, "SYNCD_CHUNK_SIZE": "10", "SYNCD_CONCURRENCY": "1"}
    await link_segment(env, sandbox, "vip", "1001")
    await insert_changes(conn, [("vip", e, "add") for e in emails("u", 30)])
    # 25 s is under SYNCD_RETRY_MAX_WAIT_S (30 s): the run holds the chunk and waits.
    await control(sandbox, "POST", "faults", {"script": [{"status": 429, "retry_after": "25"}]})
    run = await Cli.start(env, "sync")

    async def rate_limited() -> bool:
        return any(e["status"] == 429 for e in sandbox.state.log)

    await wait_until(rate_limited, 10, "the 429")
    await asyncio.sleep(0.2)  # the run has read the answer and is waiting out Retry-After
    signalled = time.time()
    run.signal(signal.SIGTERM)
    stopped = await run.finish(6)  # fails the test (and kills syncd) after 6 s
    assert stopped.code == 1, stopped
    assert [e for e in amendment_log(sandbox) if e["at"] > signalled] == []
    assert await run_statuses(conn) == ["interrupted"]
    assert "claimed" not in await chunk_states(conn)


# --- 12. migration race ---------------------------------------------------------------------------


async def test_five_concurrent_migrations_apply_once(
    env: dict[str, str], empty_database_url: str
) -> None:
    env = {**env, "SYNCD_DATABASE_URL": empty_database_url}
    gate_conn = await asyncpg.connect(empty_database_url)
    conn = await asyncpg.connect(empty_database_url)
    try:
        # Line the five up: whatever a migrator does first, it must create the schema, and
        # this uncommitted CREATE SCHEMA holds every one of them until it rolls back.
        gate = gate_conn.transaction()
        await gate.start()
        await gate_conn.execute("CREATE SCHEMA syncd")
        procs = await asyncio.gather(*(Cli.start(env, "migrate") for _ in range(5)))

        async def all_waiting() -> bool:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'syncd' AND wait_event_type = 'Lock'"
            )
            return bool(waiting == 5)

        await wait_until(all_waiting, 20, "five migrators waiting on the schema")
        await gate.rollback()
        results = await asyncio.gather(*(p.finish(30) for p in procs))
        assert [r.code for r in results] == [0] * 5, results
        said = Counter(r.stdout.strip().splitlines()[-1] for r in results)
        assert said == {
            "applied " + ", ".join(m.name for m in db.load_migrations()): 1,
            "schema is up to date": 4,
        }, results
        rows = await conn.fetch("SELECT version, name FROM syncd.schema_migrations")
        assert [tuple(r) for r in rows] == [(m.version, m.name) for m in db.load_migrations()]
    finally:
        await gate_conn.close()
        await conn.close()


# --- 13. retired API version ----------------------------------------------------------------------


async def test_a_retired_api_version_stops_the_run_with_exit_2(
    env: dict[str, str], conn: Any, sandbox: RunningSandbox
) -> None:
    env = {**env, "SYNCD_CHUNK_SIZE": "10", "SYNCD_CONCURRENCY": "2"}
    await link_segment(env, sandbox, "vip", "1001")
    changes: list[Change] = [("vip", e, "add") for e in emails("u", 50)]
    await insert_changes(conn, changes)

    result = await run_cli({**env, "CRITEO_API_VERSION": "2025-10"}, "sync")
    assert result.code == 2, result
    assert "Traceback" not in result.output, result
    lines = [
        line
        for line in result.output.splitlines()
        if "CRITEO_API_VERSION" in line and ("410" in line or "retired" in line)
    ]
    assert lines, result
    states = await chunk_states(conn)
    assert states == {"pending": 5}, states
    assert sandbox.state.amendments_applied == 0
    rows = await audit(conn)
    # Handed back with the 410, or (claimed when the run was already stopping) unsent.
    assert {r["outcome"] for r in rows} == {"released"}
    assert {(r["http_status"], r["attempts"] > 0) for r in rows} <= {(410, True), (None, False)}
    assert any(r["http_status"] == 410 for r in rows)
    assert await run_statuses(conn) == ["failed"]

    fixed = await run_cli(env, "sync")
    assert fixed.code == 0, fixed
    assert members(sandbox, "1001") == expected_members(changes, "vip")
