"""Plain-text tables for the CLI: run summaries, status, plans, links."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from syncd.plan import SegmentPlan
from syncd.status import MISSED_WINDOWS_DAYS, Status
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
    if isinstance(value, Decimal) and value == value.to_integral_value():
        value = int(value)  # sum() of integers comes back as numeric: 1.2E+5 otherwise
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
                        *_sent_and_counts(s),
                        s["error_codes"],
                    ]
                    for s in summary.segments
                ],
            )
        )
    elif not summary.waiting_unlinked:
        parts.append("nothing to send")
    if summary.waiting_unlinked:
        parts.append(_waiting_unlinked(summary.waiting_unlinked))
    if summary.budgets:
        parts.append("Criteo call budgets (each app's, shared by every process):")
        parts.append(budgets_table(summary.budgets, this_run=True))
    if summary.rejected:
        parts.append("rejected identifiers (never sent; see syncd.rejected_identifiers):")
        parts.append(
            table(
                ["segment", "reason", "identifiers"],
                [[r["segment_key"], r["reason"], r["identifiers"]] for r in summary.rejected],
            )
        )
    window = {True: "made the window", False: "MISSED the window", None: ""}[summary.made_window]
    if summary.made_window is False and summary.status != "succeeded":
        window = "did not make the window"  # work left, whatever the clock says
    parts.append(
        f"changes {summary.changes_consumed:,} · rejected {summary.identifiers_rejected:,} · "
        f"suppressed {summary.identifiers_suppressed:,} · "
        f"chunks planned {summary.chunks_planned:,} · acknowledged "
        f"{summary.chunks_acknowledged:,} · failed {summary.chunks_failed:,} · left "
        f"{summary.chunks_left:,} · requests {summary.requests:,} · {window}".rstrip(" ·")
    )
    if summary.error:
        parts.append(f"error: {summary.error}")
    return "\n".join(parts)


def _sent_and_counts(segment: Any) -> list[Any]:
    """Identifiers sent, valid, invalid; a clear sends none and Criteo answers it with no
    counts: '-' ("not said"), not zeros that read as "Criteo took none"."""
    if segment["operation"] == "clear":
        return [None, None, None]
    return [segment["sent"], segment["valid"], segment["invalid"]]


def _recent_runs(recent: Sequence[Any]) -> str:
    return table(
        [
            "run",
            "status",
            "started",
            "changes",
            "rejected",
            "suppressed",
            "ok",
            "failed",
            "left",
            "window",
        ],
        [
            [
                r["id"],
                r["status"],
                r["started_at"],
                r["changes_consumed"],
                r["identifiers_rejected"],
                r["identifiers_suppressed"],
                r["chunks_acknowledged"],
                r["chunks_failed"],
                r["chunks_left"],
                _window_cell(r["status"], r["made_window"]),
            ]
            for r in recent
        ],
    )


def _window_cell(status: str, made: bool | None) -> str:
    if made is None:
        return "-"
    if made:
        return "made"
    return "missed" if status == "succeeded" else "not made"


def _waiting_unlinked(rows: Sequence[dict[str, Any]], shown: int = 5) -> str:
    total = sum(r["changes"] for r in rows)
    keys = ", ".join(r["segment_key"] for r in rows[:shown])
    more = f" and {len(rows) - shown} more key(s)" if len(rows) > shown else ""
    return (
        f"{total:,} change(s) wait for a link: {keys}{more} "
        "(kept until `syncd segments link`; see `syncd status`)"
    )


def plan_table(plans: Sequence[SegmentPlan], chunk_size: int) -> str:
    if not plans:
        return "nothing to plan: no linked segment has waiting changes, and none is a mirror"
    return table(
        [
            "segment",
            "source",
            "changes",
            "adds",
            "removes",
            "chunks",
            "rejected",
            "suppressed",
            "guard",
        ],
        [
            [
                p.segment_key,
                "mirror" if p.mirror else "changes",
                p.changes_consumed,
                p.adds,
                p.removes,
                p.chunks,
                p.rejected,
                p.suppressed,
                _guard_verdict(p),
            ]
            for p in plans
        ],
    ) + (
        f"\n(chunks of at most {chunk_size:,} identifiers; a mirror's changes are the differences "
        "between its source and Criteo; nothing was sent or consumed)"
    )


def _guard_verdict(plan: SegmentPlan) -> str:
    held = plan.assessment
    if held is None:
        return ""
    if held.blocked:
        return f"BLOCKED: removes {held.removals:,} of {held.members:,}"
    return "ok"


def links_table(links: Sequence[dict[str, Any]]) -> str:
    if not links:
        return (
            "no segment is linked yet: "
            "syncd segments link KEY --segment-id ID --identifier-type TYPE"
        )
    return table(
        [
            "key",
            "api",
            "criteo id",
            "type",
            "send as",
            "account",
            "app",
            "mirror of",
            "waiting",
            "open chunks",
        ],
        [
            [
                s["segment_key"],
                s["api"],
                s["criteo_segment_id"],
                s["identifier_type"],
                s["send_as"],
                s["account_id"],
                s["app"],
                s["mirror_relation"],
                s["waiting_changes"],
                s["open_chunks"],
            ]
            for s in links
        ],
    )


def _api_notice(notice: Any) -> list[str]:
    """First, when Criteo called the configured API version deprecated: until when."""
    if notice is None:
        return []
    sunset = notice["api_sunset"]
    until = (
        f"sunset {sunset:%Y-%m-%d} ({notice['days_left']} days left)"
        if sunset is not None
        else "no sunset date given"
    )
    return [
        f"Criteo API version {notice['api_version']} is deprecated: {until}; set "
        "CRITEO_API_VERSION to a newer stable version before then (a retired version "
        "answers 410 and stops every run)"
    ]


def _verifications(rows: Sequence[Any]) -> list[str]:
    """Each segment's last post-window check: what Criteo counts against what syncd has
    acknowledged (the ledger)."""
    if not rows:
        return []
    table_rows = []
    for r in rows:
        theirs, ours = r["number_of_identifiers"], r["acknowledged"]
        diff = "-" if theirs is None or ours is None else f"{theirs - ours:+,}"
        table_rows.append([r["segment_key"], r["verified_window"], theirs, ours, diff])
    headers = ["key", "window", "Criteo counts", "syncd acknowledged", "difference"]
    return ["last verification per segment:", table(headers, table_rows)]


def status_text(s: Status) -> str:
    """`syncd status`, as text."""
    parts = _api_notice(s.api_notice)
    parts.append("recent runs:" if s.runs_asked else "recent runs: 0 shown (--runs 0)")
    if s.runs_asked:
        parts.append(_recent_runs(s.recent_runs) if s.recent_runs else "  none yet")
    parts += _windows(s)
    open_chunks = s.open_chunks
    parts.append("chunks not yet acknowledged:")
    parts.append(
        table(
            ["state", "chunks", "identifiers", "deferred"],
            [[r["state"], r["chunks"], r["identifiers"], r["deferred"]] for r in open_chunks],
        )
        if open_chunks
        else "  none"
    )
    parts += _blocked(s.blocked)
    parts += _failed_and_unsendable(s)
    parts += _verifications(s.verifications)
    parts += _consent(s.consent)
    if s.budgets:
        parts.append("Criteo call budgets (each app's, shared by every process):")
        parts.append(budgets_table(s.budgets))
    return "\n".join(parts + _waiting(s))


def _blocked(blocked: Sequence[Any]) -> list[str]:
    """Plans the mass-removal guard held back: nothing of them was sent."""
    if not blocked:
        return []
    rows = [
        [
            b["segment_key"],
            f"{b['blocked_removes']:,} of {b['blocked_members']:,}",
            b["blocked_at"],
            "yes: goes with the next sync" if b["removals_approved"] else "no",
        ]
        for b in blocked
    ]
    return [
        "BLOCKED by the mass-removal guard (SYNCD_MAX_REMOVE_FRACTION); nothing of these plans "
        "was sent. Fix the source, or `syncd approve KEY` if the removals are meant:",
        table(["key", "would remove", "since", "approved"], rows),
    ]


def _consent(rows: Sequence[Any]) -> list[str]:
    """Consent withdrawals the CRM inserted: waiting for the next run, or refused (the CRM
    must insert those again, corrected; syncd kept no copy of their values)."""
    parts = []
    for r in rows:
        if r["kind"] == "waiting":
            parts.append(f"consent withdrawals waiting for the next run: {r['withdrawals']:,}")
    refused = [r for r in rows if r["kind"] == "refused"]
    if refused:
        parts.append(
            f"consent withdrawals REFUSED (last {MISSED_WINDOWS_DAYS} days; insert them again, "
            "corrected; see syncd.consent_withdrawal_refusals):"
        )
        parts.append(
            table(
                ["type", "problem", "withdrawals", "oldest"],
                [
                    [r["identifier_type"], r["problem"], r["withdrawals"], r["oldest"]]
                    for r in refused
                ],
            )
        )
    return parts


def _windows(s: Status) -> list[str]:
    """The window accounting: the next window and the time left, the windows missed."""
    parts = []
    if s.next_window is not None and s.now is not None:
        left = int((s.next_window - s.now).total_seconds()) // 60
        parts.append(
            f"next window: {_cell(s.next_window)} UTC, in {left // 60} h {left % 60:02d} min"
        )
    if not s.missed_windows:
        parts.append(f"windows missed (last {MISSED_WINDOWS_DAYS} days): none")
        return parts
    parts.append(f"windows missed (last {MISSED_WINDOWS_DAYS} days, newest first):")
    parts.append(
        table(
            ["window", "runs", "last run", "statuses", "chunks left"],
            [
                [m["target_window"], m["runs"], m["last_run"], m["statuses"], m["chunks_left"]]
                for m in s.missed_windows
            ],
        )
    )
    return parts


def check_line(run: Any) -> tuple[bool, str]:
    """`syncd check`'s verdict on the last finished run: (problem?, one line)."""
    if run is None:
        return False, "ok: database reachable, schema current, no run finished yet"
    window = _cell(run["target_window"])
    if run["status"] != "succeeded":
        return True, f"the last run ({run['id']}) {run['status']}: {run['error'] or 'no detail'}"
    if run["made_window"] is False:
        return True, f"the last run ({run['id']}) ended after its window ({window} UTC)"
    return False, f"ok: last run {run['id']} succeeded and made its window ({window} UTC)"


def budgets_table(budgets: Sequence[Any], *, this_run: bool = False) -> str:
    """Each app: its limit, the calls reserved in the current minute, all calls, 429s."""
    header = ["app", "limit/min", "this minute", "calls", "429s"]
    rows = [
        [
            b["app"],
            b["limit_per_min"] or "none",
            f"{b['calls_this_minute']}"
            + (
                f" ({100 * b['calls_this_minute'] // b['limit_per_min']} %)"
                if b["limit_per_min"]
                else ""
            ),
            b["calls"],
            b["rate_limited"],
        ]
        + ([b["run_requests"]] if this_run else [])
        for b in budgets
    ]
    return table(header + (["this run"] if this_run else []), rows)


def _failed_and_unsendable(s: Status) -> list[str]:
    parts: list[str] = []
    failed = s.failed_chunks
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
    if s.unknown_app_chunks:
        parts.append(
            "chunks waiting for an app that is not configured (name it in CRITEO_APPS with "
            "its credentials, or drop them with `syncd segments unlink KEY --force`):"
        )
        parts.append(
            table(
                ["app", "key", "chunks", "identifiers"],
                [
                    [u["app"], u["segment_key"], u["chunks"], u["identifiers"]]
                    for u in s.unknown_app_chunks
                ],
            )
        )
    unsendable = s.unsendable_chunks
    if unsendable:
        parts.append("chunks that cannot be sent (other segments go on without them):")
        parts.append(
            table(
                ["key", "chunks", "identifiers", "why"],
                [
                    [
                        u["segment_key"],
                        u["chunks"],
                        u["identifiers"],
                        "no target recorded (planned before upgrade 0006 for a link since "
                        f"removed or changed): `syncd segments unlink {u['segment_key']} "
                        "--force` drops them",
                    ]
                    for u in unsendable
                ],
            )
        )
    return parts


def _waiting(s: Status) -> list[str]:
    linked_waiting = s.waiting_linked
    parts = []
    parts.append(f"changes waiting for the next plan (linked segments): {linked_waiting:,}")
    unlinked = s.waiting_unlinked
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
    for m in s.waiting_mirrored:
        parts.append(
            f"{m['changes']:,} change(s) in the inbox for {m['segment_key']} wait: it mirrors "
            f"{m['mirror_relation']}, and a mirror reads its relation, not the inbox (kept "
            "until the key reads changes again, or the CRM deletes them)"
        )
    return parts
