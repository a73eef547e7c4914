"""The daemon's service in-process: window accounting, a database that goes away under it,
and memory across many runs. Real PostgreSQL, the sandbox; sleeps injected."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import psutil
import structlog
from structlog.testing import capture_logs

from syncd import report, status
from syncd.config import Settings
from syncd.daemon import metrics
from syncd.daemon.schedule import Slot, next_window
from syncd.daemon.service import Service
from syncd.db import query
from syncd.runtime import Runtime
from syncd.sandbox import RunningSandbox
from tests.helpers import control, insert_generated_changes, link_in_process, wait_until


def slot_in(seconds: float, kind: str = "window") -> Slot:
    window = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    return Slot(kind, window, window)  # type: ignore[arg-type]


async def quick(delay_s: float) -> None:
    """Backoffs and retry waits, made short (never skipped: the loop must still yield)."""
    await asyncio.sleep(min(delay_s, 0.05))


async def chunk_states(conn: Any) -> Counter[str]:
    rows = await conn.fetch("SELECT state, count(*) AS n FROM syncd.chunks GROUP BY state")
    return Counter({r["state"]: r["n"] for r in rows})


@contextlib.asynccontextmanager
async def serving(service: Service) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(service.serve(stop))
    try:
        yield stop
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0


async def test_a_run_that_ends_after_its_window_logs_window_missed(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    settings = Settings.from_env({**env, "SYNCD_LEAD_MINUTES": "0", "SYNCD_CHUNK_SIZE": "10"})
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 20)  # two chunks
    await control(sandbox, "POST", "faults", {"latency_ms": 1200})

    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    missed_before = sample("syncd_windows_missed_total")
    ok_before = sample("syncd_runs_total", outcome="ok")
    async with Runtime.open(settings) as runtime:
        service = Service(runtime, sleep=quick)
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            async with serving(service):

                async def finished() -> bool:
                    return bool(
                        await conn.fetchval(
                            "SELECT count(*) FROM syncd.sync_runs WHERE finished_at IS NOT NULL"
                        )
                    )

                async def started() -> bool:
                    return service.alive()

                await wait_until(started, 5, "the service loop")
                left = metrics.REGISTRY.get_sample_value("syncd_next_window_seconds")
                assert left is not None and 0 < left <= 12 * 3600
                # A window the run cannot make: 0.8 s away, its requests take 1.2 s.
                service.request(slot_in(0.8))
                await wait_until(finished, 20, "the run to finish")
                await wait_until(lambda: _has(logs, "window_missed"), 5, "the window_missed line")
                assert service.alive()
            assert not service.alive()
    [missed] = [e for e in logs if e["event"] == "window_missed"]
    assert missed["log_level"] == "error"
    assert missed["status"] == "succeeded" and missed["chunks_left"] == 0
    assert missed["slot"].startswith("window:")
    assert sample("syncd_windows_missed_total") == missed_before + 1
    assert sample("syncd_runs_total", outcome="ok") == ok_before + 1
    assert sample("syncd_last_success_timestamp_seconds") > 0
    row = await conn.fetchrow("SELECT made_window, slot, target_window FROM syncd.sync_runs")
    assert row["made_window"] is False and row["slot"] == missed["slot"]


async def _has(logs: list[dict[str, Any]], event: str) -> bool:
    return any(e["event"] == event for e in logs)


async def test_a_window_run_that_leaves_work_logs_the_segments_it_left(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    settings = Settings.from_env({**env, "SYNCD_LEAD_MINUTES": "0", "SYNCD_MAX_ATTEMPTS": "1"})
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 5)
    await control(sandbox, "POST", "faults", {"script": [{"status": 400}]})
    async with Runtime.open(settings) as runtime:
        service = Service(runtime, sleep=quick)
        with capture_logs() as logs:
            stop, force = asyncio.Event(), asyncio.Event()
            assert await service.run_once(slot_in(3600), stop, force)
    [missed] = [e for e in logs if e["event"] == "window_missed"]
    assert missed["status"] == "failed" and missed["chunks_failed"] == 1
    assert missed["segments"] == [
        {"segment_key": "vip", "state": "failed", "chunks": 1, "identifiers": 5}
    ]


class Proxy:
    """A TCP proxy to PostgreSQL that the test can cut (every connection dropped, new ones
    refused) and restore: a database restart or failover, as the daemon sees it."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        socket_dir = parse_qs(parts.query).get("host", [""])[0]
        # The embedded server listens on a Unix socket; another may be on TCP.
        self.unix = f"{socket_dir}/.s.PGSQL.{parts.port or 5432}" if socket_dir else None
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.unix:
            up_reader, up_writer = await asyncio.open_unix_connection(self.unix)
        else:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}
            for w in (writer, up_writer):
                w.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


def through(url: str, port: int) -> str:
    """The database URL by way of the proxy."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc, query=""))


async def test_the_database_lost_under_a_running_daemon_is_waited_for_and_nothing_is_lost(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str], database_url: str
) -> None:
    proxy = Proxy(database_url)
    await proxy.start()
    settings = Settings.from_env(
        {
            **env,
            "SYNCD_DATABASE_URL": through(database_url, proxy.port),
            "SYNCD_LEAD_MINUTES": "0",
            "SYNCD_CHUNK_SIZE": "10",
            "SYNCD_CONCURRENCY": "2",
            # Short, so the lost run's claims are free soon (7 s after its last heartbeat);
            # not shorter: a starved event loop must still prove its liveness in time.
            "SYNCD_HTTP_TIMEOUT_S": "3",
            "SYNCD_LEASE_S": "6",
        }
    )
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 100)  # ten chunks
    await control(sandbox, "POST", "faults", {"latency_ms": 400})
    async with Runtime.open(settings) as runtime:
        service = Service(runtime, sleep=quick)
        with capture_logs() as logs:
            async with serving(service):
                service.request(slot_in(3600))

                async def some_acknowledged() -> bool:
                    return sandbox.state.amendments_applied >= 2

                try:
                    await wait_until(some_acknowledged, 20, "two acknowledged chunks")
                except AssertionError as exc:
                    raise AssertionError(f"{exc}; daemon logged: {logs}") from None
                await proxy.cut()
                await wait_until(lambda: _has(logs, "database_lost"), 20, "database_lost")
                assert not service.database_ok
                await control(sandbox, "POST", "faults", {"latency_ms": 0})
                await proxy.start()  # the same port: the database is back

                async def a_run_succeeded() -> bool:
                    return bool(
                        await conn.fetchval(
                            "SELECT count(*) FROM syncd.sync_runs WHERE status = 'succeeded'"
                        )
                    )

                await wait_until(a_run_succeeded, 40, "the slot's run again, to success")
                assert service.database_ok and service.alive()
    assert await chunk_states(conn) == {"done": 10}
    events = [e["event"] for e in logs]
    assert events.index("database_lost") < events.index("database_back")
    acks = await conn.fetch(
        "SELECT chunk_id, count(*) AS n FROM syncd.push_audit WHERE outcome = 'acknowledged' "
        "GROUP BY chunk_id"
    )
    assert len(acks) == 10 and {r["n"] for r in acks} == {1}, acks
    # At least once: a chunk whose answer was lost with the database may go again, no more.
    sent = Counter(e["idempotency_key"] for e in sandbox.state.log)
    assert len(sent) == 10 and sum(sent.values()) <= 10 + 2, sent
    statuses = [
        r["status"] for r in await conn.fetch("SELECT status FROM syncd.sync_runs ORDER BY id")
    ]
    assert statuses == ["crashed", "succeeded"], statuses
    await proxy.cut()


async def test_memory_stays_flat_over_many_runs(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    settings = Settings.from_env({**env, "SYNCD_CHUNK_SIZE": "50", "SYNCD_LEAD_MINUTES": "0"})
    await link_in_process(conn, sandbox, "vip", "1001")
    process = psutil.Process()
    rss: dict[int, int] = {}
    async with Runtime.open(settings) as runtime:
        service = Service(runtime, sleep=quick)
        stop, force = asyncio.Event(), asyncio.Event()
        for n in range(1, 61):
            await insert_generated_changes(conn, "vip", 100, first=n * 1000)
            assert await service.run_once(slot_in(3600 + n, "interval"), stop, force)
            if n in (10, 60):
                gc.collect()
                rss[n] = process.memory_info().rss
    assert await chunk_states(conn) == {"done": 120}
    grown_mib = (rss[60] - rss[10]) / 2**20
    assert grown_mib < 8, f"RSS grew {grown_mib:.1f} MiB from run 10 to run 60"


async def test_status_shows_the_windows_missed_and_the_next_window(conn: Any) -> None:
    insert = (
        "INSERT INTO syncd.sync_runs (host, pid, trigger, target_window, status, made_window, "
        "chunks_left) VALUES ('h', 1, 'window', $1, $2, $3, $4)"
    )
    now = await conn.fetchval("SELECT date_trunc('hour', now())")
    late, made, crashed = (now - dt.timedelta(hours=h) for h in (36, 24, 12))
    await conn.execute(insert, late, "succeeded", False, 0)
    await conn.execute(insert, made, "failed", False, 3)
    await conn.execute(insert, made, "succeeded", True, 0)  # a second run made it
    await conn.execute(insert, crashed, "crashed", None, 0)
    await conn.execute(insert, now + dt.timedelta(hours=1), "failed", False, 2)  # still ahead
    windows = (dt.time(0, 0), dt.time(12, 0))
    text = report.status_text(await status.read(conn, 5, windows))
    lines = text.splitlines()
    missed = lines.index("windows missed (last 30 days, newest first):")
    table = lines[missed + 3 : missed + 5]
    assert [line.split()[:3] for line in table] == [
        [crashed.strftime("%Y-%m-%d"), crashed.strftime("%H:%M:%S"), "1"],
        [late.strftime("%Y-%m-%d"), late.strftime("%H:%M:%S"), "1"],
    ], text
    [next_line] = [line for line in lines if line.startswith("next window: ")]
    upcoming = next_window(dt.datetime.now(dt.UTC), windows)
    assert next_line.startswith(f"next window: {upcoming:%Y-%m-%d %H:%M:%S} UTC, in "), text


async def test_status_with_no_window_missed(conn: Any) -> None:
    text = report.status_text(await status.read(conn, 5))
    assert "windows missed (last 30 days): none" in text.splitlines()


async def test_a_slot_held_by_a_replica_that_dies_is_taken_over_before_its_window(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str], database_url: str
) -> None:
    settings = Settings.from_env({**env, "SYNCD_LEAD_MINUTES": "0"})
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 30)
    slot = slot_in(3600)
    # Another replica runs the slot: its row, and its liveness lock on its own connection.
    other = await asyncpg.connect(database_url)
    other_run = await other.fetchval(
        "INSERT INTO syncd.sync_runs (host, pid, trigger, target_window, slot) "
        "VALUES ('other', 1, 'window', $1, $2) RETURNING id",
        slot.window,
        slot.key,
    )
    await other.execute(query("hold_run_lock"), other_run)
    async with Runtime.open(settings) as runtime:
        service = Service(runtime, sleep=quick, recheck_s=0.05)
        with capture_logs() as logs:
            async with serving(service):
                service.request(slot)
                await wait_until(
                    lambda: _has(logs, "slot_taken_elsewhere"), 10, "the slot seen taken"
                )
                assert await chunk_states(conn) == {}  # this replica planned nothing
                await other.close()  # the other replica dies: its lock goes with it

                async def taken_over() -> bool:
                    return bool(
                        await conn.fetchval(
                            "SELECT count(*) FROM syncd.sync_runs "
                            "WHERE slot = $1 AND status = 'succeeded'",
                            slot.key,
                        )
                    )

                await wait_until(taken_over, 20, "the slot's run, by this replica")
    rows = await conn.fetch("SELECT id, status FROM syncd.sync_runs ORDER BY id")
    assert [r["status"] for r in rows] == ["crashed", "succeeded"]
    assert await chunk_states(conn) == {"done": 1}


async def test_criteo_down_fails_a_run_not_the_service_and_the_next_run_finishes(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    settings = Settings.from_env(
        {**env, "SYNCD_CHUNK_SIZE": "10", "SYNCD_MAX_ATTEMPTS": "2", "SYNCD_LEAD_MINUTES": "0"}
    )
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 30)  # three chunks
    await control(sandbox, "POST", "faults", {"fault_rate_5xx": 1.0})  # Criteo is down
    stop, force = asyncio.Event(), asyncio.Event()
    async with Runtime.open(settings) as runtime:
        service = Service(runtime, sleep=quick)
        with capture_logs() as logs:
            assert await service.run_once(slot_in(3600, "interval"), stop, force)
            assert await chunk_states(conn) == {"failed": 3}
            await control(sandbox, "POST", "faults", {"fault_rate_5xx": 0.0})  # back
            assert await service.run_once(slot_in(3601, "interval"), stop, force)
    assert await chunk_states(conn) == {"done": 3}
    statuses = [
        r["status"] for r in await conn.fetch("SELECT status FROM syncd.sync_runs ORDER BY id")
    ]
    assert statuses == ["failed", "succeeded"]
    assert not [e for e in logs if e["event"] in ("run_crashed", "database_lost")]
    acks = await conn.fetchval(
        "SELECT count(DISTINCT chunk_id) FROM syncd.push_audit WHERE outcome = 'acknowledged'"
    )
    assert acks == 3


async def test_slots_due_together_run_one_after_the_other_window_first(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    settings = Settings.from_env({**env, "SYNCD_LEAD_MINUTES": "0", "SYNCD_CHUNK_SIZE": "10"})
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 30)
    await control(sandbox, "POST", "faults", {"latency_ms": 300})
    async with Runtime.open(settings) as runtime:
        service = Service(runtime, sleep=quick)
        service.request(slot_in(3600, "interval"))
        service.request(slot_in(3600))
        async with serving(service):

            async def both_finished() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM syncd.sync_runs WHERE status = 'succeeded'"
                    )
                    == 2
                )

            await wait_until(both_finished, 20, "both runs")
    first, second = await conn.fetch(
        "SELECT trigger, started_at, finished_at FROM syncd.sync_runs ORDER BY id"
    )
    assert (first["trigger"], second["trigger"]) == ("window", "interval")
    assert second["started_at"] >= first["finished_at"]  # never two runs at once


async def test_the_daemon_folds_the_ledger_after_each_run(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """After its run, with Criteo holding everything: the next run starts with nothing
    to fold, and the ledger is whole for readers."""
    settings = Settings.from_env({**env, "SYNCD_CHUNK_SIZE": "10"})
    await link_in_process(conn, sandbox, "vip", "1001")
    await insert_generated_changes(conn, "vip", 30)
    async with Runtime.open(settings) as runtime:
        service = Service(runtime, sleep=quick)
        assert await service.run_once(slot_in(3600, "interval"), asyncio.Event(), asyncio.Event())
    rows = await conn.fetch(
        "SELECT identifier FROM syncd.ledger_members WHERE criteo_segment_id = '1001'"
    )
    assert {r["identifier"] for r in rows} == sandbox.state.segments["1001"].members
    assert await conn.fetchval("SELECT count(*) FROM syncd.chunks WHERE payload IS NOT NULL") == 0
