"""Plain-text tables for the CLI: run summaries, status, plans, links."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from syncd.db import query
from syncd.plan import SegmentPlan
from syncd.sync import RunSummary

UNLINKABLE_KEY = "whitespace at an end: can never be linked; have the CRM write the key without it"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(values, widths, strict=True)
        ).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if hasattr(value, "strftime"):
        return str(value.strftime("%Y-%m-%d %H:%M:%S"))
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _numeric(text: str) -> bool:
    return text.replace(",", "").isdigit()


def run_summary(summary: RunSummary) -> str:
    parts = [f"run {summary.run_id}: {summary.status}"]
    if summary.segments:
        parts.append(
            table(
                ["segment", "op", "chunks ok", "failed", "sent", "valid", "invalid", "errors"],
                [
                    [
                        s["segment_key"],
                        s["operation"],
                        s["chunks_acknowledged"],
                        s["chunks_failed"],
                        s["sent"],
                        s["valid"],
                        s["invalid"],
                        s["error_codes"],
                    ]
                    for s in summary.segments
                ],
            )
        )
    else:
        parts.append("nothing to send")
    if summary.rejected:
        parts.append("rejected identifiers (never sent; see syncd.rejected_identifiers):")
        parts.append(
            table(
                ["segment", "reason", "identifiers"],
                [[r["segment_key"], r["reason"], r["identifiers"]] for r in summary.rejected],
            )
        )
    window = {True: "made the window", False: "MISSED the window", None: ""}[summary.made_window]
    parts.append(
        f"changes {summary.changes_consumed:,} · rejected {summary.identifiers_rejected:,} · "
        f"chunks planned {summary.chunks_planned:,} · acknowledged "
        f"{summary.chunks_acknowledged:,} · failed {summary.chunks_failed:,} · left "
        f"{summary.chunks_left:,} · requests {summary.requests:,} · {window}".rstrip(" ·")
    )
    if summary.error:
        parts.append(f"error: {summary.error}")
    return "\n".join(parts)


def plan_table(plans: Sequence[SegmentPlan], chunk_size: int) -> str:
    if not plans:
        return "nothing to plan: no linked segment has waiting changes"
    return table(
        ["segment", "changes", "adds", "removes", "chunks", "rejected"],
        [
            [p.segment_key, p.changes_consumed, p.adds, p.removes, p.chunks, p.rejected]
            for p in plans
        ],
    ) + (f"\n(chunks of at most {chunk_size:,} identifiers; nothing was sent or consumed)")


def links_table(links: Sequence[dict[str, Any]]) -> str:
    if not links:
        return (
            "no segment is linked yet: "
            "syncd segments link KEY --segment-id ID --identifier-type TYPE"
        )
    return table(
        ["key", "api", "criteo id", "type", "send as", "account", "waiting", "open chunks"],
        [
            [
                s["segment_key"],
                s["api"],
                s["criteo_segment_id"],
                s["identifier_type"],
                s["send_as"],
                s["account_id"],
                s["waiting_changes"],
                s["open_chunks"],
            ]
            for s in links
        ],
    )


async def status(conn: Any, runs: int = 5) -> str:
    parts = ["recent runs:"]
    recent = await conn.fetch(query("recent_runs"), runs)
    parts.append(
        table(
            ["run", "status", "started", "changes", "rejected", "ok", "failed", "left", "window"],
            [
                [
                    r["id"],
                    r["status"],
                    r["started_at"],
                    r["changes_consumed"],
                    r["identifiers_rejected"],
                    r["chunks_acknowledged"],
                    r["chunks_failed"],
                    r["chunks_left"],
                    {True: "made", False: "missed", None: "-"}[r["made_window"]],
                ]
                for r in recent
            ],
        )
        if recent
        else "  none yet"
    )
    open_chunks = await conn.fetch(query("open_chunks_summary"))
    parts.append("chunks not yet acknowledged:")
    parts.append(
        table(
            ["state", "chunks", "identifiers", "deferred"],
            [[r["state"], r["chunks"], r["identifiers"], r["deferred"]] for r in open_chunks],
        )
        if open_chunks
        else "  none"
    )
    failed = await conn.fetch(query("failed_chunks"), 20)
    if failed:
        parts.append("failed chunks (retried by the next run):")
        parts.append(
            table(
                ["chunk", "segment", "op", "identifiers", "last error"],
                [
                    [
                        f["id"],
                        f["segment_key"],
                        f["operation"],
                        f["identifier_count"],
                        f["last_error"],
                    ]
                    for f in failed
                ],
            )
        )
    linked_waiting = await conn.fetchval(query("waiting_linked"))
    parts.append(f"changes waiting for the next plan (linked segments): {linked_waiting:,}")
    unlinked = await conn.fetch(query("waiting_unlinked"))
    if unlinked:
        total = sum(r["changes"] for r in unlinked)
        parts.append(
            f"changes waiting for a link ({total:,} in {len(unlinked)} key(s); "
            "they are kept until `syncd segments link`):"
        )
        parts.append(
            table(
                ["key", "changes", "oldest", "note"],
                [
                    # repr shows the whitespace that makes a key unlinkable.
                    [repr(r["segment_key"]), r["changes"], r["oldest"], UNLINKABLE_KEY]
                    if r["unlinkable"]
                    else [r["segment_key"], r["changes"], r["oldest"], ""]
                    for r in unlinked
                ],
            )
        )
    return "\n".join(parts)
