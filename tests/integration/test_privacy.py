"""Privacy against a real PostgreSQL and the sandbox: erasure with proof across segments of
both APIs, the suppression list (inbox adds, mirror-style sources), consent withdrawals the
CRM inserts, consent given again, and no plain copy left behind."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from prometheus_client import generate_latest

from syncd import links, privacy, report, resync, status
from syncd.daemon.metrics import REGISTRY
from syncd.plan import plan_segment
from syncd.privacy_cli import remove_state
from syncd.sandbox import RunningSandbox
from syncd.sync import sync_once
from tests.helpers import insert_changes, sha256
from tests.integration.test_ledger import ledger
from tests.integration.test_push import with_env

PERSON = "  Jane.Doe@Example.com "
CANON = "jane.doe@example.com"
HASHED = sha256(CANON)
OTHER = "someone.else@example.com"


async def link(
    conn: Any,
    sandbox: RunningSandbox,
    key: str,
    segment_id: str,
    api: str = "retail-media",
    identifier_type: str = "email",
    send_as: str = "sha256",
) -> None:
    sandbox.state.add_segment(api, "42", identifier_type, segment_id=segment_id)
    await links.link(
        conn,
        links.Link(key, segment_id, identifier_type, api=api, send_as=send_as, account_id="42"),
    )


def members(sandbox: RunningSandbox, segment_id: str) -> set[str]:
    return set(sandbox.state.segments[segment_id].members)


async def three_segments(conn: Any, sandbox: RunningSandbox) -> None:
    """Retail Media and Marketing Solutions, hashed, and one Retail Media link sending in
    clear; a phone segment the email forget must leave alone."""
    await link(conn, sandbox, "rm", "1001")
    await link(conn, sandbox, "ms", "2001", api="marketing-solutions")
    await link(conn, sandbox, "clear", "1002", send_as="plain")
    await link(conn, sandbox, "phones", "1003", identifier_type="phoneNumber")


async def test_erasure_from_segments_of_both_apis_with_audit_rows_as_proof(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await three_segments(conn, sandbox)
    await insert_changes(
        conn,
        [(k, v, "add") for k in ("rm", "ms", "clear") for v in (PERSON, OTHER)]
        + [("phones", "+33 6 12 34 56 78", "add")],
    )
    settings = with_env(env)
    assert (await sync_once(settings)).exit_code == 0
    assert HASHED in members(sandbox, "1001") and HASHED in members(sandbox, "2001")
    assert CANON in members(sandbox, "1002")

    done = await privacy.forget(conn, PERSON, "email", settings.chunk_size)
    assert sorted((s.segment_key, s.held) for s in done.segments) == [
        ("clear", 1),
        ("ms", 1),
        ("rm", 1),
    ]
    suppression, rows = await privacy.erasure_report(conn, CANON, "email")
    assert suppression is not None
    now = dt.datetime.now(dt.UTC)
    assert {remove_state(r, now) for r in rows} == {"pending: waits for the next run"}

    assert (await sync_once(settings)).exit_code == 0
    for segment_id in ("1001", "2001", "1002"):
        assert HASHED not in members(sandbox, segment_id)
        assert CANON not in members(sandbox, segment_id)
    assert members(sandbox, "1001") == {sha256(OTHER)}
    assert members(sandbox, "1002") == {OTHER}
    assert len(members(sandbox, "1003")) == 1
    assert await ledger(conn, "1002") == {OTHER}

    _, rows = await privacy.erasure_report(conn, "JANE.DOE@example.com", "email")
    assert sorted(r["segment_key"] for r in rows) == ["clear", "ms", "rm"]
    for r in rows:
        audit = await conn.fetchrow(
            "SELECT outcome, request_date FROM syncd.push_audit "
            "WHERE plan_id = $1 AND operation = 'remove'",
            r["plan_id"],
        )
        assert audit["outcome"] == "acknowledged"
        assert r["request_date"] == audit["request_date"]
        assert remove_state(r, now).startswith("acknowledged ")


async def test_a_later_add_in_the_inbox_is_suppressed_and_removes_still_go(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await three_segments(conn, sandbox)
    settings = with_env(env)
    await privacy.forget(conn, PERSON, "email", settings.chunk_size)
    await insert_changes(
        conn,
        [
            ("rm", CANON, "add"),
            ("ms", HASHED, "add"),
            ("clear", PERSON, "add"),
            ("rm", OTHER, "add"),
            ("ms", CANON, "remove"),
        ],
    )
    summary = await sync_once(settings)
    assert summary.exit_code == 0
    assert summary.identifiers_suppressed == 2  # rm and clear; ms nets to a remove
    assert summary.changes_consumed == 5
    for segment_id in ("1001", "2001", "1002"):
        assert not members(sandbox, segment_id) & {CANON, HASHED}
    assert members(sandbox, "1001") == {sha256(OTHER)}
    plans = {
        r["segment_key"]: (r["suppressed"], r["removes"])
        for r in await conn.fetch(
            "SELECT segment_key, suppressed, removes FROM syncd.plans WHERE run_id = $1",
            summary.run_id,
        )
    }
    assert plans == {"rm": (1, 0), "ms": (0, 1), "clear": (1, 0)}
    assert await conn.fetchval("SELECT count(*) FROM syncd.membership_changes") == 0
    row = await conn.fetchrow(
        "SELECT identifiers_suppressed FROM syncd.sync_runs WHERE id = $1", summary.run_id
    )
    assert row["identifiers_suppressed"] == 2


async def test_a_mirror_source_still_listing_the_person_is_suppressed(
    crm: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    """A forgotten person the mirror source still lists: removed from both mirror links
    (hashed and in clear), never added back by the next diffs nor by a resync."""
    conn = crm
    settings = with_env(env)
    for key, segment_id, send_as in (("m", "1001", "sha256"), ("p", "1002", "plain")):
        sandbox.state.add_segment("retail-media", "42", "email", segment_id=segment_id)
        await links.link(
            conn,
            links.Link(key, segment_id, "email", send_as=send_as, account_id="42",
                       mirror="crm.members"),
        )  # fmt: skip
        await conn.execute("INSERT INTO crm.members VALUES ($1, $2), ($1, $3)", key, PERSON, OTHER)
    assert (await sync_once(settings)).exit_code == 0
    assert members(sandbox, "1001") == {HASHED, sha256(OTHER)}
    assert members(sandbox, "1002") == {CANON, OTHER}

    await privacy.forget(conn, PERSON, "email", settings.chunk_size)
    summary = await sync_once(settings)
    assert summary.exit_code == 0
    assert members(sandbox, "1001") == {sha256(OTHER)}
    assert members(sandbox, "1002") == {OTHER}
    assert summary.identifiers_suppressed == 2  # one per link: the diffs would add them
    again = await sync_once(settings)  # the source still lists the person
    assert again.exit_code == 0 and again.chunks_planned == 0

    queued = await resync.queue(conn, settings, "m", force=True, now=dt.datetime.now(dt.UTC))
    assert queued.adds == 1
    assert (await sync_once(settings)).exit_code == 0
    assert members(sandbox, "1001") == {sha256(OTHER)}


async def test_every_send_as_gives_one_key_per_type(conn: Any) -> None:
    samples = {
        "email": " Jane@Example.com",
        "phoneNumber": "+44 (0)20 7946 0958",
        "madid": "6D92078A-8246-4BA4-AE5B-76104861E7DC",
        "identityLink": "idl-42",
        "customerId": "C-1001",
    }
    for identifier_type, raw in samples.items():
        canon, key = await privacy.normalise_one(conn, raw, identifier_type)
        assert len(key) == 64 and key != canon  # never the plain value
        for send_as in ("sha256", "plain"):
            sent_key = await conn.fetchval(
                "SELECT syncd.suppression_key(syncd.identifier_to_send($1, $2, $3), $2, $3)",
                canon,
                identifier_type,
                send_as,
            )
            assert sent_key == key, (identifier_type, send_as)


async def test_forget_deletes_every_plain_copy(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await three_segments(conn, sandbox)
    settings = with_env(env)
    await insert_changes(
        conn,
        [
            ("unlinked", "JANE.DOE@EXAMPLE.COM", "add"),
            ("phones", PERSON, "add"),  # written for another type: a plain copy all the same
            ("rm", HASHED.upper(), "remove"),  # a pre-hashed copy
            ("rm", OTHER, "add"),
            ("rm", "not an address", "add"),
        ],
    )
    # An add planned before the forget and not sent yet (and a copy among rejected rows).
    await insert_changes(conn, [("ms", PERSON, "add"), ("ms", OTHER, "add")])
    run_id = await conn.fetchval(
        "INSERT INTO syncd.sync_runs (host, pid, target_window) VALUES ('t', 1, now()) RETURNING id"
    )
    await plan_segment(conn, run_id, "ms", 50_000)
    await conn.execute(
        "INSERT INTO syncd.rejected_identifiers (run_id, plan_id, change_id, segment_key, "
        "identifier, operation, reason, changed_at) VALUES ($1, 0, 0, 'x', $2, 'add', "
        "'contains_whitespace', now()), ($1, 0, 0, 'x', 'kept@example.com ok', 'add', "
        "'contains_whitespace', now())",
        run_id,
        "Jane.Doe@example.com",
    )
    await conn.execute(
        "INSERT INTO syncd.push_audit (run_id, chunk_id, plan_id, segment_key, api, "
        "criteo_segment_id, operation, identifier_type, identifiers_sent, attempts, outcome, "
        "started_at, sample_invalid_identifiers) VALUES ($1, 0, 0, 'rm', 'retail-media', "
        "'1001', 'add', 'email', 3, 1, 'acknowledged', now(), $2::jsonb)",
        run_id,
        json.dumps([HASHED, CANON, "kept"]),
    )

    done = await privacy.forget(conn, PERSON, "email", settings.chunk_size)
    assert (done.inbox_deleted, done.rejected_deleted, done.samples_scrubbed) == (3, 1, 1)
    assert done.unsent_adds_dropped == 1
    inbox = await conn.fetch("SELECT identifier FROM syncd.membership_changes ORDER BY id")
    assert [r["identifier"] for r in inbox] == [OTHER, "not an address"]
    rejected = await conn.fetch("SELECT identifier FROM syncd.rejected_identifiers")
    assert [r["identifier"] for r in rejected] == ["kept@example.com ok"]
    sample = await conn.fetchval("SELECT sample_invalid_identifiers FROM syncd.push_audit")
    assert json.loads(sample) == ["kept"]
    add = await conn.fetchrow(
        "SELECT payload, identifier_count FROM syncd.chunks WHERE segment_key = 'ms' "
        "AND operation = 'add'"
    )
    assert (json.loads(add["payload"]), add["identifier_count"]) == ([sha256(OTHER)], 1)
    for table in ("suppressions", "erasures"):
        dump = await conn.fetchval(
            f"SELECT coalesce(string_agg(t::text, ''), '') FROM syncd.{table} t"
        )
        assert CANON not in dump.lower()

    assert (await sync_once(settings)).exit_code == 0
    assert members(sandbox, "2001") == {sha256(OTHER)}  # the add never went
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM syncd.push_audit WHERE segment_key = 'ms' "
            "AND operation = 'add' AND identifiers_sent = 1"
        )
        == 1
    )


async def test_a_withdrawal_inserted_by_the_crm_is_a_forget_and_keeps_no_copy(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await three_segments(conn, sandbox)
    settings = with_env(env)
    await insert_changes(conn, [("rm", PERSON, "add"), ("ms", OTHER, "add")])
    assert (await sync_once(settings)).exit_code == 0
    await conn.execute(
        "INSERT INTO syncd.consent_withdrawals (identifier, identifier_type, reason) VALUES "
        "($1, 'email', 'unsubscribed'), ('not-an-address', 'email', NULL), "
        "('x@example.com', 'shoe size', NULL), (NULL, 'EMAIL', NULL), "
        "('JANE.DOE@example.com', 'email', 'twice')",
        PERSON,
    )
    await insert_changes(conn, [("rm", CANON, "add")])  # waiting: a plain copy, deleted
    summary = await sync_once(settings)
    assert (summary.exit_code, summary.changes_consumed) == (0, 0)
    assert HASHED not in members(sandbox, "1001")
    await insert_changes(conn, [("rm", CANON, "add")])  # later: suppressed
    summary = await sync_once(settings)
    assert (summary.exit_code, summary.identifiers_suppressed) == (0, 1)
    assert HASHED not in members(sandbox, "1001")
    assert await conn.fetchval("SELECT count(*) FROM syncd.consent_withdrawals") == 0
    refused = await conn.fetch(
        "SELECT identifier_type, problem FROM syncd.consent_withdrawal_refusals "
        "ORDER BY withdrawal_id"
    )
    assert [tuple(r) for r in refused] == [
        ("email", "not_an_email"),
        (None, "unknown_identifier_type"),
        ("email", "empty"),
    ]
    row = await conn.fetchrow(
        "SELECT reason, source FROM syncd.suppressions WHERE hashed_identifier = $1", HASHED
    )
    assert tuple(row) == ("unsubscribed", "consent_withdrawal")
    shown = report.status_text(await status.read(conn))
    assert "consent withdrawals REFUSED" in shown
    assert "unknown_identifier_type" in shown and "not_an_email" in shown
    assert "x@example.com" not in shown and "not-an-address" not in shown
    _, rows = await privacy.erasure_report(conn, CANON, "email")
    assert {r["source"] for r in rows} == {"consent_withdrawal"}
    assert all(r["request_date"] is not None for r in rows)


async def test_consent_given_again_lets_adds_through(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await link(conn, sandbox, "rm", "1001")
    settings = with_env(env)
    await privacy.forget(conn, PERSON, "email", settings.chunk_size)
    assert await privacy.remove_suppression(conn, CANON, "email") is not None
    assert await privacy.remove_suppression(conn, CANON, "email") is None
    await insert_changes(conn, [("rm", PERSON, "add")])
    summary = await sync_once(settings)
    assert (summary.exit_code, summary.identifiers_suppressed) == (0, 0)
    assert members(sandbox, "1001") == {HASHED}
    _, rows = await privacy.erasure_report(conn, CANON, "email")
    assert len(rows) == 1  # the erasure's proof stays


async def test_no_metric_holds_an_identifier(
    conn: Any, sandbox: RunningSandbox, env: dict[str, str]
) -> None:
    await three_segments(conn, sandbox)
    await insert_changes(conn, [("clear", PERSON, "add"), ("rm", PERSON, "add")])
    assert (await sync_once(with_env(env))).exit_code == 0
    await privacy.forget(conn, PERSON, "email", 50_000)
    assert (await sync_once(with_env(env))).exit_code == 0
    exposed = generate_latest(REGISTRY).decode().lower()
    for value in (CANON, HASHED, HASHED[:16]):
        assert value not in exposed


async def test_the_crm_role_of_the_readme_can_insert_a_withdrawal(conn: Any) -> None:
    """The grants the README gives the CRM's role (Database privileges) are enough."""
    role = f"crm_writer_{await conn.fetchval('SELECT pg_backend_pid()')}"
    await conn.execute(f"CREATE ROLE {role}")
    try:
        await conn.execute(f"GRANT USAGE ON SCHEMA syncd TO {role}")
        await conn.execute(f"GRANT INSERT ON syncd.consent_withdrawals TO {role}")
        await conn.execute(f"GRANT USAGE ON SEQUENCE syncd.consent_withdrawals_id_seq TO {role}")
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {role}")
            await conn.execute(
                "INSERT INTO syncd.consent_withdrawals (identifier, reason) VALUES ($1, 'x')",
                PERSON,
            )
        assert await conn.fetchval("SELECT identifier_type FROM syncd.consent_withdrawals") == (
            "email"
        )
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


async def test_each_segment_gets_the_remove_as_its_own_link_sends_it(
    conn: Any, sandbox: RunningSandbox
) -> None:
    """One forget writes the removes of several segments in one transaction: each plan's
    chunk holds that link's value as sent, and nothing of another segment's."""
    await three_segments(conn, sandbox)
    await privacy.forget(conn, PERSON, "email", 50_000)
    rows = await conn.fetch(
        "SELECT segment_key, operation, convert_from(payload, 'UTF8')::json AS sent "
        "FROM syncd.chunks ORDER BY segment_key"
    )
    got = {r["segment_key"]: (r["operation"], json.loads(r["sent"])) for r in rows}
    assert got == {
        "clear": ("remove", [CANON]),
        "ms": ("remove", [HASHED]),
        "rm": ("remove", [HASHED]),
    }
