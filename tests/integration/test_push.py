"""Pushing, in process: concurrency, the shared 429 back-off, splitting, deferral, answers."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from syncd import links, report, status
from syncd import push as push_module
from syncd.config import Settings
from syncd.criteo import CriteoClient, Target, amend, amendment_body
from syncd.db import close_pool, create_pool
from syncd.errors import RetryableError, RunAbortingError
from syncd.plan import plan_segment
from syncd.push import PAYLOAD_SLICE_BYTES, Pusher, Sleep
from syncd.runtime import Runtime
from syncd.sandbox import RunningSandbox
from syncd.sync import run_sync, sync_once
from tests.helpers import sha256


async def setup_segments(
    conn: Any, sandbox: RunningSandbox, count: int, per_segment: int, api: str = "retail-media"
) -> None:
    for n in range(count):
        criteo_id = str(1000 + n)
        sandbox.state.add_segment(api, "42", "email", segment_id=criteo_id)
        await links.link(conn, links.Link(f"s{n}", criteo_id, "email", api=api))
        await conn.execute(
            "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
            "SELECT $1, 'user' || g || '@example.com', 'add' FROM generate_series(1, $2) g",
            f"s{n}",
            per_segment,
        )


async def faults(sandbox: RunningSandbox, **body: Any) -> None:
    # A file-like body: aiohttp warns (ResourceWarning) about raw bodies over 1 MiB.
    data = io.BytesIO(json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{sandbox.url}/_sandbox/faults", data=data, headers=headers) as resp,
    ):
        assert resp.status == 200, await resp.text()


def with_env(env: dict[str, str], **extra: str) -> Settings:
    return Settings.from_env({**env, **extra})


@dataclass
class Pushing:
    """A pusher of its own (pool, client, run rows), for tests that step into one push."""

    pool: Any
    client: CriteoClient
    pusher: Pusher
    run_ids: list[int]


@asynccontextmanager
async def pushing(
    conn: Any, settings: Settings, sleep: Sleep = asyncio.sleep
) -> AsyncIterator[Pushing]:
    """Plan segment s0 for a first run, and a pusher for that run (a second run row too)."""
    run_ids = [
        await conn.fetchval(
            "INSERT INTO syncd.sync_runs (host, pid, target_window) "
            "VALUES ('t', 1, now()) RETURNING id"
        )
        for _ in range(2)
    ]
    pool = await create_pool(settings)
    try:
        async with pool.acquire() as pconn:
            await plan_segment(pconn, run_ids[0], "s0", 50_000)
        async with CriteoClient.open(settings) as client:
            pusher = Pusher(pool, client, settings, run_ids[0], sleep)
            yield Pushing(pool, client, pusher, run_ids)
    finally:
        await pool.close()


async def test_concurrency_is_capped_and_used(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=6, per_segment=300)
    await faults(sandbox, latency_ms=150)
    settings = with_env(env, SYNCD_CONCURRENCY="3", SYNCD_CHUNK_SIZE="100")
    summary = await sync_once(settings)
    assert summary.exit_code == 0
    assert summary.chunks_acknowledged == 18
    stats = sandbox.state.stats()
    assert stats["max_in_flight"] == 3  # never more than SYNCD_CONCURRENCY, and all of it used
    for n in range(6):
        members = sandbox.state.segments[str(1000 + n)].members
        assert members == {sha256(f"user{i}@example.com") for i in range(1, 301)}


async def test_429_pauses_every_sender(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=4, per_segment=10)
    await faults(sandbox, script=[{"status": 429, "retry_after": "1"}])
    started = time.monotonic()
    summary = await sync_once(with_env(env, SYNCD_CONCURRENCY="4"))
    assert summary.exit_code == 0
    log = sandbox.state.stats()["log"]
    first_429 = next(e["at"] for e in log if e["status"] == 429)
    after = [e["at"] for e in log if e["status"] == 200 and e["at"] > first_429 + 0.05]
    # Every request that started after the 429 waited out the shared cool-down.
    assert after and min(after) >= first_429 + 0.95
    assert time.monotonic() - started >= 1.0


async def test_too_large_chunk_is_halved(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=1000)
    await faults(sandbox, script=[{"status": 413}])
    summary = await sync_once(with_env(env))
    assert summary.exit_code == 0
    rows = await conn.fetch("SELECT outcome, identifiers_sent FROM syncd.push_audit ORDER BY id")
    assert [(r["outcome"], r["identifiers_sent"]) for r in rows] == [
        ("split", 1000),
        ("acknowledged", 500),
        ("acknowledged", 500),
    ]
    assert len(sandbox.state.segments["1000"].members) == 1000


async def test_long_retry_after_defers_the_chunk_to_a_later_run(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    await faults(sandbox, script=[{"status": 429, "retry_after": "120"}])
    summary = await sync_once(with_env(env, SYNCD_RETRY_MAX_WAIT_S="5"))
    assert (summary.exit_code, summary.chunks_left) == (1, 1)
    chunk = await conn.fetchrow(
        "SELECT state, available_at > now() + interval '100 s' AS later FROM syncd.chunks"
    )
    assert (chunk["state"], chunk["later"]) == ("pending", True)
    audit = await conn.fetchrow("SELECT outcome, http_status FROM syncd.push_audit")
    assert (audit["outcome"], audit["http_status"]) == ("deferred", 429)
    # Once due, the next run sends it.
    await conn.execute("UPDATE syncd.chunks SET available_at = now()")
    assert (await sync_once(with_env(env))).exit_code == 0


async def test_attempt_cap_fails_the_chunk_and_the_next_run_retries(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    await faults(sandbox, script=[{"status": 503}] * 3)
    summary = await sync_once(with_env(env, SYNCD_MAX_ATTEMPTS="3"))
    assert (summary.exit_code, summary.chunks_failed) == (1, 1)
    audit = await conn.fetchrow("SELECT outcome, attempts, http_status FROM syncd.push_audit")
    assert (audit["outcome"], audit["attempts"], audit["http_status"]) == ("failed", 3, 503)
    again = await sync_once(with_env(env))
    assert (again.exit_code, again.chunks_acknowledged) == (0, 1)


async def test_a_429_storm_never_fails_the_chunk(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """More 429s in a row than SYNCD_MAX_ATTEMPTS: rate limiting is "later", not a fault,
    so the chunk ends acknowledged; every sending is still counted in the audit."""
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    await faults(sandbox, script=[{"status": 429, "retry_after": "0"}] * 7)

    async def sleep(delay: float) -> None:
        pass

    settings = with_env(env, SYNCD_MAX_ATTEMPTS="3", SYNCD_RETRY_BASE_S="0.01")
    summary = await sync_once(settings, sleep=sleep)
    assert (summary.exit_code, summary.chunks_acknowledged, summary.chunks_failed) == (0, 1, 0)
    audit = await conn.fetchrow("SELECT outcome, attempts FROM syncd.push_audit")
    assert (audit["outcome"], audit["attempts"]) == ("acknowledged", 8)


async def test_faults_count_towards_the_cap_and_429s_between_them_do_not(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """Two 5xx with 429 storms between them, then one more 5xx: the
    third real fault reaches SYNCD_MAX_ATTEMPTS=3 and fails the chunk."""
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    storm = [{"status": 429, "retry_after": "0"}] * 4
    await faults(
        sandbox, script=[{"status": 503}, *storm, {"status": 502}, *storm, {"status": 503}]
    )

    async def sleep(delay: float) -> None:
        pass

    settings = with_env(env, SYNCD_MAX_ATTEMPTS="3", SYNCD_RETRY_BASE_S="0.01")
    summary = await sync_once(settings, sleep=sleep)
    assert (summary.exit_code, summary.chunks_failed) == (1, 1)
    audit = await conn.fetchrow("SELECT outcome, attempts, http_status FROM syncd.push_audit")
    assert (audit["outcome"], audit["attempts"], audit["http_status"]) == ("failed", 11, 503)


async def test_invalid_counts_and_warnings_are_kept(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    sandbox.state.add_segment("retail-media", "42", "email", segment_id="77")
    await links.link(conn, links.Link("plain", "77", "email", send_as="plain"))
    # Plain-text sending is the per-segment opt-in; the sandbox judges what it receives.
    await conn.execute(
        "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) VALUES "
        "('plain', 'ok@example.com', 'add'), ('plain', 'also.ok@example.org', 'add')"
    )
    await faults(sandbox)
    summary = await sync_once(with_env(env))
    assert summary.exit_code == 0
    row = await conn.fetchrow("SELECT * FROM syncd.push_audit")
    assert row["nb_valid_identifiers"] == 2 and row["nb_invalid_identifiers"] == 0
    assert row["request_date"] is not None and row["contact_list_id"] is not None
    assert sandbox.state.segments["77"].members == {"ok@example.com", "also.ok@example.org"}


async def test_a_deprecated_version_is_warned_once_per_run_and_shown_by_status(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """Two runs in one long-lived runtime (the daemon's case): one warning each, naming
    the version and the sunset; status shows it with the days left."""
    await setup_segments(conn, sandbox, count=1, per_segment=3)
    settings = with_env(env, CRITEO_API_VERSION="2026-01", SYNCD_CHUNK_SIZE="1")
    with capture_logs() as logs:
        async with Runtime.open(settings) as runtime:
            assert (await run_sync(runtime)).exit_code == 0
            await conn.execute(
                "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
                "VALUES ('s0', 'late@example.com', 'add')"
            )
            assert (await run_sync(runtime)).exit_code == 0
    warned = [e for e in logs if e["event"] == "criteo_api_version_deprecated"]
    assert [(e["api_version"], e["sunset"]) for e in warned] == [
        ("2026-01", "2027-01-27T00:00:00+00:00")
    ] * 2
    notice = (await status.read(conn)).api_notice
    assert notice is not None and notice["api_version"] == "2026-01"
    text = report.status_text(await status.read(conn))
    assert "Criteo API version 2026-01 is deprecated: sunset 2027-01-27" in text
    assert "days left" in text and "CRITEO_API_VERSION" in text


async def test_a_current_version_shows_no_notice(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=3)
    assert (await sync_once(with_env(env))).exit_code == 0
    assert (await status.read(conn)).api_notice is None


async def test_logs_carry_no_identifier_or_secret(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=3)
    await faults(sandbox, script=[{"status": 503}])
    with capture_logs() as logs:
        await sync_once(with_env(env))
    text = repr(logs)
    assert "user1@example.com" not in text and sha256("user1@example.com") not in text
    assert "sandbox-secret" not in text
    assert {"run_started", "segment_planned", "chunk_retry", "chunk_pushed", "run_finished"} <= {
        e["event"] for e in logs
    }
    finished = next(e for e in logs if e["event"] == "run_finished")
    assert 0 < finished["planning_s"] < finished["duration_s"]
    assert (finished["changes"], finished["chunks_acknowledged"]) == (3, 1)


async def test_chunk_taken_over_before_its_body_is_read_is_not_sent(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """The body streams from the payload only while this run owns the chunk: if another
    run took it over, the request is cut short and the push ends as lease_lost."""
    await setup_segments(conn, sandbox, count=1, per_segment=20_000)  # several slices
    async with pushing(conn, with_env(env)) as p:
        chunk = await p.pusher.claim()
        assert chunk is not None and chunk.payload_bytes > PAYLOAD_SLICE_BYTES
        renew = p.pusher._renew_lease

        async def renewed_then_taken_over(c: Any) -> bool:
            # The race: the lease is renewed, then another run takes the chunk
            # before the upload reads its payload.
            ok = await renew(c)
            await conn.execute(
                "UPDATE syncd.chunks SET owner_run_id = $2 WHERE id = $1", c.id, p.run_ids[1]
            )
            return ok

        p.pusher._renew_lease = renewed_then_taken_over  # type: ignore[method-assign]
        assert await p.pusher.push(chunk) == "lease_lost"
    assert sandbox.state.stats()["amendments_applied"] == 0
    assert sandbox.state.segments["1000"].members == set()
    outcomes = await conn.fetch("SELECT outcome FROM syncd.push_audit")
    assert [r["outcome"] for r in outcomes] == ["lease_lost"]


async def test_a_lost_database_mid_run_is_reported_as_itself(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str], monkeypatch: Any
) -> None:
    """An error inside the run's task groups surfaces as the error itself (for the CLI's
    one line), and the run row records it."""
    await setup_segments(conn, sandbox, count=1, per_segment=10)

    async def lost(self: Pusher) -> None:
        raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle")

    monkeypatch.setattr(Pusher, "claim", lost)
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await sync_once(with_env(env))
    run = await conn.fetchrow("SELECT status, error FROM syncd.sync_runs")
    assert run["status"] == "failed"
    assert run["error"] == "ConnectionDoesNotExistError: connection was closed in the middle"


async def test_2xx_with_errors_and_no_counts_fails_the_chunk(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """Criteo answered 2xx but reports errors and no counts: nothing says the identifiers
    were taken, so the chunk fails with Criteo's code and keeps its payload."""
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    answer = {"data": {}, "errors": [{"code": "contact-list-locked", "detail": "try later"}]}
    await faults(sandbox, script=[{"status": 200, "body": json.dumps(answer)}])
    summary = await sync_once(with_env(env))
    assert (summary.exit_code, summary.chunks_failed, summary.chunks_acknowledged) == (1, 1, 0)
    chunk = await conn.fetchrow("SELECT state, payload IS NOT NULL AS kept FROM syncd.chunks")
    assert (chunk["state"], chunk["kept"]) == ("failed", True)
    audit = await conn.fetchrow("SELECT * FROM syncd.push_audit")
    assert (audit["outcome"], audit["http_status"]) == ("failed", 200)
    assert audit["error_code"] == "contact-list-locked"
    assert json.loads(audit["errors"]) == answer["errors"]


# --- answers that are not what the documentation shows ------------------------------------

HTML_502 = base64.b64encode(b"<html><body>\xff\xfe 502 Bad Gateway</body></html>").decode()


def ok(text: str) -> dict[str, Any]:
    """A scripted 200 answer with this body, sent byte for byte."""
    return {"status": 200, "body": text}


@pytest.mark.parametrize(
    ("answer", "outcomes", "nb_valid"),
    [
        # Unreadable (not UTF-8, not JSON, over the size cap, nested past any sense):
        # retried, and the next attempt is acknowledged.
        ({"status": 502, "body_base64": HTML_502}, ["acknowledged"], 5),
        ({"status": 200, "body_base64": HTML_502}, ["acknowledged"], 5),
        (ok("<html>ok</html>"), ["acknowledged"], 5),
        (
            ok(json.dumps({"data": {"nbValidIdentifiers": 1}, "pad": "x" * (2 << 20)})),
            ["acknowledged"],
            5,
        ),
        (ok("[" * 100_000), ["acknowledged"], 5),
        # Applied, with fields that cannot be read as they should: kept as unknown.
        (ok('{"data": {"sampleInvalidIdentifiers": 3}}'), ["acknowledged"], None),
        (ok('{"data": {"nbValidIdentifiers": 2147483648}}'), ["acknowledged"], None),
        (ok('{"data": {"nbValidIdentifiers": 1e400}}'), ["acknowledged"], None),
        (ok('{"data": {"nbValidIdentifiers": NaN}}'), ["acknowledged"], None),
        (
            ok('{"data": {"nbValidIdentifiers": 5, "requestDate": "0001-01-01T00:00:00+05:00"}}'),
            ["acknowledged"],
            5,
        ),
        (
            ok('{"data": {"nbValidIdentifiers": 5}, "warnings": 3, "errors": "e"}'),
            ["acknowledged"],
            5,
        ),
        (
            ok('{"data": {"nbValidIdentifiers": 5}, "warnings": [{"c": "a\\u0000\\ud800"}]}'),
            ["acknowledged"],
            5,
        ),
        (
            ok('{"data": {"nbValidIdentifiers": 5}, "warnings": [{"x": NaN, "y": -1e400}]}'),
            ["acknowledged"],
            5,
        ),
        # Refused, with a code that cannot be stored as sent.
        ({"status": 400, "body": '{"errors": [{"code": "bad\\u0000\\ud800"}]}'}, ["failed"], None),
    ],
)
async def test_unexpected_answers_never_crash_the_run(
    conn: Any,
    sandbox: RunningSandbox,
    env: dict[str, str],
    answer: dict[str, Any],
    outcomes: list[str],
    nb_valid: int | None,
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    await faults(sandbox, script=[answer])
    summary = await sync_once(with_env(env))
    assert summary.exit_code == (0 if outcomes == ["acknowledged"] else 1)
    rows = await conn.fetch("SELECT * FROM syncd.push_audit ORDER BY id")
    assert [r["outcome"] for r in rows] == outcomes
    assert rows[-1]["nb_valid_identifiers"] == nb_valid


async def test_an_unexpected_error_finishes_its_chunk_and_spares_the_others(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str], monkeypatch: Any
) -> None:
    """A bug met while pushing one chunk fails that chunk, with the reason; the run's
    other requests go on."""
    await setup_segments(conn, sandbox, count=3, per_segment=5)
    real_send = push_module.send_chunk

    async def send_chunk(client: Any, target: Target, *args: Any, **kw: Any) -> Any:
        if target.segment_id == "1001":
            raise ZeroDivisionError("a bug")
        return await real_send(client, target, *args, **kw)

    monkeypatch.setattr(push_module, "send_chunk", send_chunk)
    summary = await sync_once(with_env(env, SYNCD_CONCURRENCY="3"))
    assert (summary.exit_code, summary.chunks_acknowledged, summary.chunks_failed) == (1, 2, 1)
    failed = await conn.fetchrow("SELECT * FROM syncd.push_audit WHERE outcome = 'failed'")
    assert (failed["segment_key"], failed["error_code"]) == ("s1", "unexpected")
    assert "ZeroDivisionError" in failed["error_detail"]


@asynccontextmanager
async def token_client(env: dict[str, str], answer: web.Response) -> AsyncIterator[CriteoClient]:
    """A client whose token endpoint (on loopback) gives one fixed answer: the sandbox's
    token endpoint only answers correctly."""
    app = web.Application()

    async def token(request: web.Request) -> web.Response:
        return answer

    app.router.add_post("/oauth2/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with CriteoClient.open(with_env(env, CRITEO_API_URL=url)) as client:
            yield client
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("expires_in", ['"soon"', "[1]", "1e400", "NaN", "-5", "null"])
async def test_a_token_whose_lifetime_is_not_a_number_is_still_used(
    env: dict[str, str], expires_in: str
) -> None:
    body = '{"access_token": "t0k3n", "token_type": "Bearer", "expires_in": ' + expires_in + "}"
    answer = web.Response(body=body, content_type="application/json")
    async with token_client(env, answer) as client:
        assert await client.token() == "t0k3n"
        assert await client.token() == "t0k3n"  # cached: the lifetime is a sane one


async def test_an_unreadable_token_answer_is_retryable(env: dict[str, str]) -> None:
    answer = web.Response(body=b"\xff<html>proxy</html>", status=200)
    async with token_client(env, answer) as client:
        with pytest.raises(RetryableError):
            await client.token()


async def test_a_token_url_that_answers_404_names_the_api_url(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=1)
    settings = with_env(env, CRITEO_API_URL=f"{sandbox.url}/wrong/prefix")
    async with CriteoClient.open(settings) as client:
        with pytest.raises(RunAbortingError) as refused:
            await client.token()
    assert "CRITEO_API_URL" in str(refused.value) and "credentials" not in str(refused.value)
    summary = await sync_once(settings)
    assert summary.exit_code == 2 and "CRITEO_API_URL" in (summary.error or "")


# --- the lease and the token ---------------------------------------------------------------


async def test_the_lease_is_renewed_before_every_send_the_401_resend_too(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """A token refetch can take longer than the lease (queued behind other refetches):
    the re-send after a 401 renews the lease first, like every send."""
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    async with pushing(conn, with_env(env)) as p:
        chunk = await p.pusher.claim()
        assert chunk is not None
        await p.client.token()
        sandbox.state.expire_tokens()  # the first send meets a 401
        fetch, send = p.client._fetch_token, p.client._send
        live_at_send: list[bool] = []

        async def slow_fetch() -> None:
            await conn.execute("UPDATE syncd.chunks SET lease_until = now() - interval '1 s'")
            await fetch()

        async def observed_send(*args: Any, **kw: Any) -> Any:
            live_at_send.append(await conn.fetchval("SELECT lease_until > now() FROM syncd.chunks"))
            return await send(*args, **kw)

        p.client._fetch_token = slow_fetch  # type: ignore[method-assign]
        p.client._send = observed_send  # type: ignore[method-assign]
        assert await p.pusher.push(chunk) == "acknowledged"
    assert live_at_send == [True, True]


async def test_many_401s_at_once_refetch_the_token_once(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    sandbox.state.add_segment("retail-media", "42", "email", segment_id="1000")
    target = Target("retail-media", "1000", "email")
    payload = json.dumps([sha256("a@example.com")]).encode()

    async def identifiers() -> AsyncIterator[bytes]:
        yield payload

    body = amendment_body(target, "add", len(payload), identifiers)
    async with CriteoClient.open(with_env(env)) as client:
        await client.token()
        sandbox.state.expire_tokens()  # every request below meets a 401 with that token
        before = sandbox.state.token_requests
        results = await asyncio.gather(*(amend(client, target, body, f"k{n}") for n in range(6)))
    assert [r.http_status for r in results] == [200] * 6
    assert sandbox.state.token_requests - before == 1


# --- rate-limit waits ------------------------------------------------------------------------


async def test_a_zero_or_past_rate_limit_wait_still_backs_off(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    script = [
        {"status": 429, "retry_after": "0"},
        {"status": 429, "headers": {"x-ratelimit-reset": "1000"}},  # 1970: long past
        {"status": 429, "retry_after": "-3"},
    ]
    await faults(sandbox, script=script)
    waits: list[float] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)

    summary = await sync_once(with_env(env, SYNCD_RETRY_BASE_S="0.1"), sleep=sleep)
    assert summary.exit_code == 0
    # At least the backoff step (base * 2^(attempt-1)) before each of the three retries.
    assert len(waits) == 3
    assert all(w >= step for w, step in zip(waits, (0.1, 0.2, 0.4), strict=True))


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "inf"},
        {"Retry-After": "1e400"},
        {"Retry-After": "99999999999999999999999"},
        {"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"},
        {"x-ratelimit-reset": "1700000000000000"},  # microseconds, not seconds
    ],
)
async def test_absurd_rate_limit_waits_are_capped(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str], headers: dict[str, str]
) -> None:
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    await faults(sandbox, script=[{"status": 429, "headers": headers}])
    waits: list[float] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)

    summary = await sync_once(with_env(env, SYNCD_RETRY_MAX_WAIT_S="5"), sleep=sleep)
    assert (summary.exit_code, summary.chunks_left) == (1, 1)
    assert all(w <= 5 for w in waits)
    chunk = await conn.fetchrow(
        "SELECT state, available_at > now() + interval '30 s' AS later, "
        "available_at < now() + interval '2 hours' AS bounded FROM syncd.chunks"
    )
    assert (chunk["state"], chunk["later"], chunk["bounded"]) == ("pending", True, True)


async def test_a_long_shared_cooldown_hands_waiting_chunks_back(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """A chunk about to wait out another request's long 429 goes back with its due time
    instead of holding its claim (and a sender) for the whole wait."""
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    waits: list[float] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)

    async with pushing(conn, with_env(env, SYNCD_RETRY_MAX_WAIT_S="5"), sleep) as p:
        chunk = await p.pusher.claim()
        assert chunk is not None
        p.client.cooldown.trip(3600)  # another request met Retry-After: 3600
        assert await p.pusher.push(chunk) == "deferred"
    assert waits == [] and sandbox.state.stats()["log"] == []
    row = await conn.fetchrow(
        "SELECT state, owner_run_id, available_at > now() + interval '3500 s' AS later "
        "FROM syncd.chunks"
    )
    assert (row["state"], row["owner_run_id"], row["later"]) == ("pending", None, True)


async def test_a_cooldown_extended_during_a_wait_hands_the_chunk_back(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """A chunk waiting out a short cool-down is handed back when another request's 429
    extends it past SYNCD_RETRY_MAX_WAIT_S meanwhile, instead of sending into it."""
    await setup_segments(conn, sandbox, count=1, per_segment=5)
    waits: list[float] = []
    client: list[CriteoClient] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)
        client[0].cooldown.trip(3600)  # another request met Retry-After: 3600 meanwhile

    async with pushing(conn, with_env(env, SYNCD_RETRY_MAX_WAIT_S="5"), sleep) as p:
        client.append(p.client)
        chunk = await p.pusher.claim()
        assert chunk is not None
        p.client.cooldown.trip(2)
        assert await p.pusher.push(chunk) == "deferred"
    assert len(waits) == 1 and waits[0] <= 2 and sandbox.state.stats()["log"] == []


async def test_a_long_429_ends_the_run_instead_of_stalling_it(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """Retry-After: 3600 with SYNCD_RETRY_MAX_WAIT_S=5: the run ends at once (exit 1) with
    the chunks left pending, instead of keeping `syncd sync` alive for an hour."""
    await setup_segments(conn, sandbox, count=4, per_segment=5)
    await faults(sandbox, script=[{"status": 429, "retry_after": "3600"}])
    waits: list[float] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)

    settings = with_env(env, SYNCD_RETRY_MAX_WAIT_S="5", SYNCD_CONCURRENCY="1")
    summary = await sync_once(settings, sleep=sleep)
    assert (summary.exit_code, summary.chunks_left) == (1, 4)
    assert all(w <= 5 for w in waits)
    assert len(sandbox.state.stats()["log"]) == 1  # nothing sent into the cool-down
    deferred = await conn.fetchval(
        "SELECT count(*) FROM syncd.chunks WHERE available_at > now() + interval '3500 s'"
    )
    assert deferred == 1


# --- resources: connections, tasks -----------------------------------------------------------


async def test_a_reset_mid_upload_leaves_no_connection_held(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """A reset in the middle of an upload leaves the body's generator suspended, and
    anything that keeps the error (a retry loop's last error, a log) keeps the generator:
    it must not hold a pooled connection, or closing the pool waits for ever."""
    await setup_segments(conn, sandbox, count=1, per_segment=50_000)  # many slices
    await faults(sandbox, script=[{"drop": "upload"}])
    kept: list[BaseException] = []
    async with pushing(conn, with_env(env, SYNCD_MAX_ATTEMPTS="1")) as p:
        chunk = await p.pusher.claim()
        assert chunk is not None and chunk.payload_bytes > 4 * PAYLOAD_SLICE_BYTES
        send = p.client._send

        async def keeping_send(*args: Any, **kw: Any) -> Any:
            try:
                return await send(*args, **kw)
            except Exception as exc:
                kept.append(exc)
                raise

        p.client._send = keeping_send  # type: ignore[method-assign]
        assert await p.pusher.push(chunk) == "failed"
        await asyncio.wait_for(p.pool.close(), 5)
    assert len(kept) == 1  # still held while the pool closed
    assert [e["fault"] for e in sandbox.state.stats()["log"]] == ["drop_upload"]


async def test_a_body_left_suspended_between_slices_holds_no_connection(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """Where a reset mid-upload may leave the body: suspended after a slice, never resumed
    nor closed (a writer that failed while waiting for the socket to drain)."""
    await setup_segments(conn, sandbox, count=1, per_segment=20_000)  # several slices
    async with pushing(conn, with_env(env)) as p:
        chunk = await p.pusher.claim()
        assert chunk is not None and chunk.payload_bytes > PAYLOAD_SLICE_BYTES
        pieces = p.pusher._body(chunk).pieces()
        assert (await anext(pieces)).startswith(b'{"data"')
        assert len(await anext(pieces)) == PAYLOAD_SLICE_BYTES
        await asyncio.wait_for(p.pool.close(), 5)
        await pieces.aclose()


async def test_closing_the_pool_is_bounded(database_url: str, settings: Settings) -> None:
    pool = await create_pool(settings)
    held = await pool.acquire()  # never released: a stuck holder
    started = time.monotonic()
    await asyncio.wait_for(close_pool(pool, timeout_s=0.5), 10)
    assert time.monotonic() - started < 5
    assert pool.is_closing()
    with pytest.raises(asyncpg.InterfaceError):  # terminated: given back, unusable
        await held.fetchval("SELECT 1")


async def test_a_cancelled_pause_leaves_no_task_behind(settings: Settings) -> None:
    sleeping = asyncio.Event()

    async def sleep(delay: float) -> None:
        sleeping.set()
        await asyncio.Event().wait()  # for ever

    before = asyncio.all_tasks()
    async with CriteoClient.open(settings) as client:
        pusher = Pusher(None, client, settings, 1, sleep)
        paused = asyncio.create_task(pusher._pause(60))
        await sleeping.wait()
        paused.cancel()
        with pytest.raises(asyncio.CancelledError):
            await paused
        left = [t for t in asyncio.all_tasks() - before if not t.done()]
        assert left == [asyncio.current_task()] or left == []
