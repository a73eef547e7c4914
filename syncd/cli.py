"""The `syncd` command: parse arguments, read settings, hand off, print, exit.

Exit codes: 0 done; 1 work left failing; 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import asyncpg

from syncd import __version__, db, guard, links, plan, report, status
from syncd.config import Settings
from syncd.db import migrations
from syncd.errors import ConfigError, MigrationError, SyncdError, UsageError
from syncd.logging import configure_logging
from syncd.signals import run_until_signalled, run_until_signalled_twice
from syncd.sync import sync_once

if TYPE_CHECKING:
    from syncd.sandbox import InitialSegment, SandboxConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="syncd",
        description="Keep Criteo contact-list audience segments in step with CRM membership "
        "in PostgreSQL. Settings come from environment variables (see .env.example).",
    )
    p.add_argument("--version", action="version", version=f"syncd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("migrate", help="create or upgrade the syncd schema")
    sub.add_parser("sync", help="plan and push every waiting change now (one run)")
    sub.add_parser("run", help="the daemon: a run ahead of each window in SYNCD_WINDOWS_UTC")
    sub.add_parser(
        "check",
        help="exit 1 when the database is unreachable, migrations are behind, or the last "
        "run failed or missed its window (for probes and cron monitors)",
    )
    sub.add_parser("plan", help="show what a sync would send; sends and consumes nothing")
    ap = sub.add_parser(
        "approve", help="let the next sync push a segment's plan the removal guard blocked"
    )
    ap.add_argument("key")
    rs = sub.add_parser(
        "resync",
        help="queue a rebuild of a segment's list on Criteo: a clear, then every member",
    )
    rs.add_argument("key")
    rs.add_argument(
        "--force", action="store_true", help="even close to a window, or leaving few members"
    )
    st = sub.add_parser("status", help="recent runs, open chunks, waiting changes")
    st.add_argument("--runs", type=_count, default=5, help="how many recent runs to show")

    seg = sub.add_parser("segments", help="link CRM segment keys to Criteo segments")
    seg_sub = seg.add_subparsers(dest="segments_command", required=True, metavar="ACTION")
    _link_parsers(seg_sub)
    _segment_lifecycle_parsers(seg_sub)
    _privacy_parsers(sub)
    _sandbox_parser(sub)
    dm = sub.add_parser("demo", help="end to end on a throwaway PostgreSQL and the sandbox")
    dm.add_argument("--changes", type=int, default=300_000, help="CRM changes to write")
    return p


def _link_parsers(seg_sub: Any) -> None:
    ln = seg_sub.add_parser("link", help="link (or re-point) a segment key")
    ln.add_argument("key", help="the CRM's segment_key in syncd.membership_changes")
    ln.add_argument("--segment-id", required=True, help="Criteo's audience segment id")
    ln.add_argument("--identifier-type", required=True, help="email, phoneNumber, madid, ...")
    ln.add_argument("--api", default="retail-media", help="retail-media or marketing-solutions")
    ln.add_argument("--account-id", help="Criteo account (Retail Media) or advertiser id")
    ln.add_argument("--gum-caller-id", type=_ascii_int, help="required for identifier type gum")
    ln.add_argument(
        "--app",
        default="default",
        help="the Criteo app (CRITEO_APPS) whose credentials and budget push this segment",
    )
    ln.add_argument(
        "--send-as",
        default="sha256",
        help="sha256 (default: emails and phones hashed) or plain (sent normalised, unhashed)",
    )
    ln.add_argument(
        "--mirror",
        metavar="RELATION",
        help="mirror a table or view (columns segment_key, identifier) instead of the inbox",
    )
    ln.add_argument(
        "--force",
        action="store_true",
        help="re-point even while chunks are unsent (they still go to their old target)",
    )
    seg_sub.add_parser("list", help="list the links")
    un = seg_sub.add_parser("unlink", help="remove a link")
    un.add_argument("key")
    un.add_argument("--force", action="store_true", help="also drop chunks not yet sent")


def _privacy_parsers(sub: Any) -> None:
    fo = sub.add_parser(
        "forget",
        help="erase an identifier: removes queued in every linked segment of its type, "
        "suppressed, plain copies deleted",
    )
    fo.add_argument("identifier", help="the plain value (or - to read it from stdin)")
    fo.add_argument("--identifier-type", default="email", help="email (default), phoneNumber, ...")
    fo.add_argument("--reason", help="kept with the suppression (default: erasure requested)")
    fo.add_argument(
        "--report",
        action="store_true",
        help="change nothing: per segment, when Criteo acknowledged the remove, or why not yet",
    )
    su = sub.add_parser("suppressions", help="the identifiers no segment may add again")
    su_sub = su.add_subparsers(dest="suppressions_command", required=True, metavar="ACTION")
    su_sub.add_parser("list", help="list the suppressions (keys only, never plain values)")
    rm = su_sub.add_parser("remove", help="consent given again: the identifier may be added")
    rm.add_argument("identifier", help="the plain value (or - to read it from stdin)")
    rm.add_argument("--identifier-type", default="email")


def _sandbox_parser(sub: Any) -> None:
    sb = sub.add_parser("sandbox", help="serve a Criteo-compatible API on loopback")
    sb.add_argument("--host", default="127.0.0.1")
    sb.add_argument("--port", type=int, default=8181)
    sb.add_argument("--latency-ms", type=float, default=0.0)
    sb.add_argument("--fault-rate-5xx", type=float, default=0.0)
    sb.add_argument("--fault-rate-429", type=float, default=0.0)
    sb.add_argument("--fault-rate-drop", type=float, default=0.0)
    sb.add_argument("--token-ttl-s", type=int, default=900)
    sb.add_argument(
        "--rate-limit-per-min",
        type=_ascii_int,
        help="enforce a call budget per app (client id), e.g. 250 as Criteo does",
    )
    sb.add_argument(
        "--rate-limit-mode",
        choices=("window", "bucket"),
        default="window",
        help="a fixed one-minute window, or a bucket refilling continuously (--rate-limit-burst)",
    )
    sb.add_argument(
        "--rate-limit-burst", type=_ascii_int, default=4, help="calls a full bucket holds"
    )
    sb.add_argument(
        "--rate-limit-retry-after",
        action="store_true",
        help="send Retry-After on a 429 (Criteo does not document it: off by default)",
    )
    sb.add_argument(
        "--segment",
        action="append",
        default=[],
        type=_initial_segment,
        metavar="ID[:API[:TYPE]]",
        help="a segment the sandbox holds from the start (repeatable; API retail-media and "
        "TYPE email by default), e.g. 523103620:retail-media:email",
    )


# The segment commands that call Criteo (they need CRITEO_CLIENT_ID/SECRET).
REMOTE_SEGMENT_COMMANDS = ("create", "search", "rename", "delete", "stats")


def _segment_lifecycle_parsers(seg_sub: Any) -> None:
    cr = seg_sub.add_parser("create", help="create a contact-list segment on Criteo and link it")
    cr.add_argument("key", help="the CRM's segment_key to link to the new segment")
    cr.add_argument("--name", required=True, help="the segment's name (unique per account)")
    cr.add_argument("--description")
    cr.add_argument("--identifier-type", required=True, help="email, phoneNumber, madid, ...")
    owner = cr.add_mutually_exclusive_group(required=True)
    owner.add_argument("--account-id", help="Retail Media account (with --retailer-id)")
    owner.add_argument("--advertiser-id", help="Marketing Solutions advertiser")
    cr.add_argument("--retailer-id", help="Retail Media retailer (with --account-id)")
    cr.add_argument("--send-as", default="sha256", help="sha256 (default) or plain")
    cr.add_argument("--app", default="default", help="the Criteo app (CRITEO_APPS) to use")
    se = seg_sub.add_parser("search", help="list the contact-list segments Criteo holds")
    where = se.add_mutually_exclusive_group(required=True)
    where.add_argument("--account-id", help="a Retail Media account")
    where.add_argument("--advertiser-id", help="a Marketing Solutions advertiser")
    se.add_argument("--name", help="only segments whose name holds this text")
    se.add_argument("--app", default="default", help="the Criteo app (CRITEO_APPS) to ask")
    rn = seg_sub.add_parser("rename", help="rename the linked segment on Criteo")
    rn.add_argument("key")
    rn.add_argument("--name", required=True)
    rn.add_argument("--description")
    de = seg_sub.add_parser("delete", help="delete the linked segment on Criteo, then unlink")
    de.add_argument("key")
    de.add_argument("--force", action="store_true", help="also drop chunks not yet sent")
    sa = seg_sub.add_parser("stats", help="read Criteo's contact-list statistics")
    sa.add_argument("key", nargs="?", help="one linked key (default: every link)")


def _ascii_int(text: str) -> int:
    """A whole number in ASCII digits (int() would also take '١٢٣', '1_0' and '²')."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text!r}")
    return int(text)


def _count(raw: str) -> int:
    # ASCII digits only: int() would also take '-1', '1_0' and full-width digits.
    if not (raw.isascii() and raw.isdigit()):
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number (0 or more)")
    return int(raw)


def _initial_segment(raw: str) -> InitialSegment:
    from syncd.sandbox import InitialSegment  # aiohttp: only for the sandbox command

    try:
        return InitialSegment.parse(raw)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(
            f"{exc}; use ID[:API[:TYPE]], e.g. 523103620:retail-media:email"
        ) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (ConfigError, UsageError, MigrationError) as exc:
        print(f"syncd: {exc}", file=sys.stderr)
        return 2
    except asyncpg.InsufficientPrivilegeError as exc:  # the role, not syncd, must change
        reason = (str(exc).splitlines() or ["permission denied"])[0]
        print(f"syncd: {reason}; {db.PRIVILEGES_HINT}", file=sys.stderr)
        return 2
    except SyncdError as exc:  # DatabaseUnavailable among them: try again later
        print(f"syncd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or an outage: one line for people, the details in the log
        logging.getLogger("syncd").exception("unexpected_error")
        print(f"syncd: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "sandbox":
        configure_logging("info", "json")
        from syncd.sandbox import serve

        config = _sandbox_config(args)
        run_until_signalled(
            lambda stop: serve(
                config, args.host, args.port, stop, lambda url: _announce_sandbox(url, config)
            )
        )
        return 0
    if args.command == "demo":
        configure_logging("warning", "console")
        from syncd.demo import run_demo

        return run_demo(args.changes)

    remote = getattr(args, "segments_command", None) in REMOTE_SEGMENT_COMMANDS
    settings = Settings.from_env(need_criteo=args.command in ("sync", "run") or remote)
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "sync":
        return run_until_signalled(lambda stop: _sync(settings, stop))
    if args.command == "run":
        from syncd.daemon.service import run_daemon  # APScheduler: only for the daemon

        return run_until_signalled_twice(lambda stop, force: run_daemon(settings, stop, force))
    if remote:
        from syncd.segments_cli import run_segment_command

        return asyncio.run(run_segment_command(settings, args))
    return asyncio.run(_with_connection(settings, args))


def _sandbox_config(args: argparse.Namespace) -> SandboxConfig:
    """The sandbox accepts the credentials syncd will send (CRITEO_CLIENT_ID/SECRET) when
    they are set, its own defaults otherwise; the sandbox package never reads the env."""
    from syncd.sandbox import SandboxConfig

    defaults = SandboxConfig()
    return SandboxConfig(
        client_id=os.environ.get("CRITEO_CLIENT_ID", "").strip() or defaults.client_id,
        client_secret=os.environ.get("CRITEO_CLIENT_SECRET", "").strip() or defaults.client_secret,
        latency_ms=args.latency_ms,
        fault_rate_5xx=args.fault_rate_5xx,
        fault_rate_429=args.fault_rate_429,
        fault_rate_drop=args.fault_rate_drop,
        token_ttl_s=args.token_ttl_s,
        segments=tuple(args.segment),
        rate_limit_per_minute=args.rate_limit_per_min or None,
        rate_limit_mode=args.rate_limit_mode,
        rate_limit_burst=max(1, args.rate_limit_burst),
        rate_limit_retry_after=args.rate_limit_retry_after,
        clients=_sandbox_clients(),
    )


def _sandbox_clients() -> tuple[tuple[str, str], ...]:
    """The apps named in CRITEO_APPS whose credentials are set: the sandbox accepts them
    too, each with its own budget (read from the environment, never from argv)."""
    clients = []
    for name in os.environ.get("CRITEO_APPS", "").split(","):
        prefix = f"CRITEO_APP_{name.strip().upper()}_"
        client_id = os.environ.get(prefix + "CLIENT_ID", "").strip()
        secret = os.environ.get(prefix + "CLIENT_SECRET", "").strip()
        if name.strip() and client_id and secret:
            clients.append((client_id, secret))
    return tuple(clients)


def _announce_sandbox(url: str, config: SandboxConfig) -> None:
    """One line for a person (the JSON log line is for machines); never the secret."""
    if os.environ.get("CRITEO_CLIENT_SECRET", "").strip():
        accepted = "the secret in CRITEO_CLIENT_SECRET"
    else:
        accepted = "its built-in secret (set CRITEO_CLIENT_ID and CRITEO_CLIENT_SECRET to choose)"
    segments = ", ".join(
        f"{s.id} ({s.api}, {s.identifier_type or 'any type'})" for s in config.segments
    )
    print(
        f"syncd sandbox: serving on {url}; use CRITEO_API_URL={url}; it accepts client id "
        f"{config.client_id!r} with {accepted}; segments: {segments or 'none yet'}",
        file=sys.stderr,
        flush=True,
    )


async def _sync(settings: Settings, stop: asyncio.Event) -> int:
    summary = await sync_once(settings, stop=stop)
    print(report.run_summary(summary))
    if summary.aborted:  # a settings problem: said on stderr like any other
        print(f"syncd: {summary.error}", file=sys.stderr)
    return summary.exit_code


async def _with_connection(settings: Settings, args: argparse.Namespace) -> int:
    conn = await db.connect(settings)
    try:
        if args.command == "migrate":
            applied = await migrations.migrate(conn)
            print(f"applied {', '.join(applied)}" if applied else "schema is up to date")
            return 0
        if args.command == "check":
            return await _check(conn)
        await migrations.check_schema(conn)
        if args.command == "status":
            found = await status.read(conn, args.runs, settings.windows_utc, settings.app_names)
            print(report.status_text(found))
            return 0
        if args.command == "approve":
            removes, members = await guard.approve(conn, args.key)
            print(
                f"approved: the next sync pushes the plan of {args.key} as it is then "
                f"(blocked, it removed {removes:,} of {members:,} acknowledged members)"
            )
            return 0
        if args.command == "resync":
            from syncd import resync

            now = dt.datetime.now(dt.UTC)
            queued = await resync.queue(conn, settings, args.key, force=args.force, now=now)
            print(resync.said(queued))
            return 0
        if args.command == "plan":
            plans = await plan.preview(conn, settings.chunk_size, settings.max_remove_fraction)
            print(report.plan_table(plans, settings.chunk_size))
            return 0
        if args.command in ("forget", "suppressions"):
            from syncd.privacy_cli import run_privacy_command

            return await run_privacy_command(conn, args, settings)
        return await _segments(conn, args, settings)
    finally:
        await conn.close()


async def _check(conn: Any) -> int:
    """`syncd check`: 0 healthy; 1 migrations behind, or the last run failed or missed its
    window (an unreachable database is 1 too, from main). One line either way."""
    pending = await migrations.pending_migrations(conn)
    if pending:
        print(f"syncd: {len(pending)} migration(s) pending; run `syncd migrate`", file=sys.stderr)
        return 1
    problem, line = report.check_line(await status.last_finished_run(conn))
    print(f"syncd: {line}" if problem else line, file=sys.stderr if problem else sys.stdout)
    return 1 if problem else 0


async def _segments(conn: Any, args: argparse.Namespace, settings: Settings) -> int:
    if args.segments_command == "list":
        print(report.links_table(await links.list_links(conn)))
        return 0
    if args.segments_command == "unlink":
        dropped = await links.unlink(conn, args.key, force=args.force)
        print(f"unlinked {args.key}" + (f" (dropped {dropped} unsent chunk(s))" if dropped else ""))
        return 0
    if args.app not in settings.app_names:
        raise UsageError(
            f"--app {args.app!r} is not a configured Criteo app; the apps are "
            f"{', '.join(settings.app_names)} (name more in CRITEO_APPS)"
        )
    outcome = await links.link(
        conn,
        links.Link(
            segment_key=args.key,
            criteo_segment_id=args.segment_id,
            identifier_type=args.identifier_type,
            api=args.api,
            send_as=args.send_as,
            account_id=args.account_id,
            gum_caller_id=args.gum_caller_id,
            app=args.app,
            mirror=args.mirror,
        ),
        force=args.force,
    )
    print(outcome.summary)
    return 0
