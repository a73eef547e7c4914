"""The `syncd forget` and `syncd suppressions` handlers: call syncd.privacy, print a table.

Nothing printed holds the identifier: the user typed it, and only the command line has it
(`-` reads it from stdin, out of the process list and the shell history)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

from syncd import privacy
from syncd.config import Settings
from syncd.errors import UsageError
from syncd.report import table

KEY_SHOWN = 12  # hex digits of a suppression key shown: enough to tell rows apart


async def run_privacy_command(conn: Any, args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "suppressions" and args.suppressions_command == "list":
        print(suppressions_table(await privacy.list_suppressions(conn)))
        return 0
    raw = _identifier(args.identifier)
    if args.command == "suppressions":
        removed = await privacy.remove_suppression(conn, raw, args.identifier_type)
        name = privacy.type_name(args.identifier_type)
        if removed is None:
            print(f"no suppression for that {name}: nothing to remove")
            return 1
        print(
            f"removed the suppression of that {name} (suppressed since "
            f"{removed['created_at']:%Y-%m-%d %H:%M:%S}): adds for it are sent again"
        )
        return 0
    if args.report:
        suppression, rows = await privacy.erasure_report(conn, raw, args.identifier_type)
        text, complete = erasure_report_text(
            privacy.type_name(args.identifier_type), suppression, rows
        )
        print(text)
        return 0 if complete else 1
    done = await privacy.forget(conn, raw, args.identifier_type, settings.chunk_size, args.reason)
    print(forgotten_text(done))
    return 0


def _identifier(given: str) -> str:
    if given != "-":
        return given
    line = sys.stdin.readline().rstrip("\n")
    if not line:
        raise UsageError("no identifier on stdin")
    return line


def forgotten_text(done: privacy.Forgotten) -> str:
    name = done.identifier_type
    state = "suppressed" if done.newly_suppressed else "already suppressed"
    if not done.segments:
        parts = [f"forgot that {name} ({state}); no segment of type {name} is linked"]
    else:
        parts = [
            f"forgot that {name} ({state}); a remove is queued for the next run in "
            f"{len(done.segments)} segment(s):",
            table(
                ["segment", "api", "criteo id", "send as", "in ledger", "plan"],
                [
                    [
                        s.segment_key,
                        s.api,
                        s.criteo_segment_id,
                        s.send_as,
                        "yes" if s.held else "no",
                        s.plan_id,
                    ]
                    for s in done.segments
                ],
            ),
        ]
    parts.append(
        f"plain copies deleted: {done.inbox_deleted} inbox change(s), "
        f"{done.rejected_deleted} rejected identifier(s), {done.samples_scrubbed} audit "
        f"sample(s); unsent add chunk(s) it was taken out of: {done.unsent_adds_dropped}"
    )
    parts.append("proof: syncd forget --report (with the same identifier)")
    return "\n".join(parts)


def erasure_report_text(name: str, suppression: Any, rows: list[Any]) -> tuple[str, bool]:
    """The report, and whether every remove was acknowledged."""
    if suppression is None:
        head = f"that {name} is not suppressed (never forgotten, or consent given again)"
    else:
        head = (
            f"that {name} is suppressed since {suppression['created_at']:%Y-%m-%d %H:%M:%S} "
            f"({suppression['source']}: {suppression['reason']})"
        )
    if not rows:
        return f"{head}\nno erasure recorded for it", False
    now = dt.datetime.now(dt.UTC)
    lines = [(r, remove_state(r, now)) for r in rows]
    body = table(
        ["requested", "source", "segment", "api", "criteo id", "in ledger", "remove"],
        [
            [
                r["requested_at"],
                r["source"],
                r["segment_key"],
                r["api"],
                r["criteo_segment_id"],
                None if r["held_in_ledger"] is None else ("yes" if r["held_in_ledger"] else "no"),
                state,
            ]
            for r, state in lines
        ],
    )
    complete = all(state.startswith(("acknowledged", "nothing")) for _, state in lines)
    return f"{head}\n{body}", complete


def remove_state(r: Any, now: dt.datetime) -> str:
    """Acknowledged (with Criteo's request date), or pending and why."""
    if r["segment_key"] is None:
        return "nothing to remove: no segment of the type was linked"
    state = r["open_state"]
    if state is None and r["acknowledged_at"] is not None:
        when = r["request_date"] or r["acknowledged_at"]
        return f"acknowledged {when:%Y-%m-%d %H:%M:%S} (Criteo request date)"
    error = f"; last error: {r['last_error']}" if r["last_error"] else ""
    if state == "claimed":
        return "pending: being sent by a run now"
    if state == "failed":
        return f"pending: failed after {r['attempts']} attempt(s), the next run retries{error}"
    if state == "pending" and r["available_at"] > now:
        return f"pending: retry due {r['available_at']:%Y-%m-%d %H:%M:%S}{error}"
    if state == "pending":
        return f"pending: waits for the next run{error}"
    return "not sent: its chunk was dropped (the segment was unlinked or deleted with --force)"


def suppressions_table(rows: list[Any]) -> str:
    if not rows:
        return "no suppression: every identifier may be added"
    return (
        table(
            ["type", "key", "reason", "source", "since"],
            [
                [
                    r["identifier_type"],
                    r["hashed_identifier"][:KEY_SHOWN] + "…",
                    r["reason"],
                    r["source"],
                    r["created_at"],
                ]
                for r in rows
            ],
        )
        + f"\n{len(rows):,} suppression(s); keys are SHA-256 hex, shortened"
    )
