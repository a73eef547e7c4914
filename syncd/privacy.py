"""Privacy: forget a person (erasure with proof), the suppression list, consent withdrawals.

A forget normalises the identifier like any change, then, in one transaction under the
plan lock of every linked segment of its type (so plan ids keep ordering each segment's
changes): queues a remove in each of those segments as an ordinary plan and chunk (the
outbox; each link's own value as sent), suppresses it (sql/0016: a key, never the plain
value), records the proof rows, and deletes every plain copy syncd holds: inbox changes of
any key and type, rejected identifiers, Criteo's audit samples, and adds no push has
started yet. The CRM's withdrawals (syncd.consent_withdrawals) are the same forget, run by
each sync before it plans. SQL in db/queries/privacy.sql; nothing here logs a value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from syncd import ledger, mirror, plan
from syncd.db import query
from syncd.errors import UsageError
from syncd.identifiers import find_type
from syncd.logging import get_logger

log = get_logger(__name__)

Source = Literal["forget", "consent_withdrawal"]
# Withdrawals taken per transaction: a bounded set of chunks and proof rows at a time.
WITHDRAWAL_BATCH = 10_000


@dataclass(frozen=True)
class Identifiers:
    """Identifiers of one type, normalised: canonical forms (for the removes and the
    plain-copy search, never stored) and suppression keys, in the same order."""

    identifier_type: str
    canons: list[str]
    keys: list[str]
    reasons: list[str | None]


@dataclass(frozen=True)
class ErasedIn:
    segment_key: str
    api: str
    criteo_segment_id: str
    send_as: str
    plan_id: int
    removes: int
    held: int  # how many of the identifiers the segment's ledger held


@dataclass
class Forgotten:
    identifier_type: str
    identifiers: int
    segments: list[ErasedIn] = field(default_factory=list)
    newly_suppressed: int = 0
    inbox_deleted: int = 0
    rejected_deleted: int = 0
    samples_scrubbed: int = 0
    unsent_adds_dropped: int = 0


def type_name(raw: str) -> str:
    """syncd's name for an identifier type (any API); UsageError for an unknown one."""
    found = find_type(raw)
    if found is None:
        raise UsageError(f"unknown identifier type {raw!r}; use one of {_known_types()}")
    return found.name


def _known_types() -> str:
    from syncd.identifiers import TYPES

    return ", ".join(t.name for t in TYPES.values())


async def normalise_one(conn: Any, raw: str, identifier_type: str) -> tuple[str, str]:
    """(canonical form, suppression key) of one identifier a user typed; UsageError (never
    quoting the value) when it cannot be an identifier of the type."""
    row = (await conn.fetch(query("identifier_keys"), [raw], identifier_type))[0]
    if row["problem"] is not None:
        raise UsageError(
            f"that is not a valid {identifier_type} identifier ({row['problem']}); "
            "nothing was forgotten"
        )
    return row["canon"], row["hashed"]


async def forget(
    conn: Any,
    raw: str,
    identifier_type: str,
    chunk_size: int,
    reason: str | None = None,
) -> Forgotten:
    """`syncd forget`: one identifier, everywhere."""
    name = type_name(identifier_type)
    canon, key = await normalise_one(conn, raw, name)
    batch = Identifiers(name, [canon], [key], [reason])
    return await forget_batch(conn, batch, "forget", chunk_size, run_id=None)


async def forget_batch(
    conn: Any,
    batch: Identifiers,
    source: Source,
    chunk_size: int,
    run_id: int | None,
    taken: Any = None,
) -> Forgotten:
    """Forget identifiers of one type in one transaction, under the plan locks of the
    type's linked segments. `taken`, when given, is a statement to run first in the same
    transaction (the withdrawals it takes are then deleted only if the forget commits)."""
    await ledger.fold(conn)  # readers fold first: the ledger then says who held what
    name = batch.identifier_type
    keys = [r["segment_key"] for r in await conn.fetch(query("linked_segment_keys"), name)]
    async with plan.plan_locks(conn, *keys), conn.transaction():
        if taken is not None:
            batch = await taken()
        outcome = Forgotten(name, len(batch.canons))
        if not batch.canons:
            return outcome
        await _queue_removes(conn, batch, source, chunk_size, run_id, outcome)
        await _delete_copies(conn, batch, outcome)
        outcome.newly_suppressed = await conn.fetchval(
            query("suppress"), name, batch.keys, batch.reasons, source
        )
    log.info(
        "identifiers_forgotten",
        source=source,
        identifier_type=name,
        identifiers=outcome.identifiers,
        segments=len(outcome.segments),
        held_in_ledger=sum(s.held for s in outcome.segments),
        newly_suppressed=outcome.newly_suppressed,
        inbox_deleted=outcome.inbox_deleted,
        rejected_deleted=outcome.rejected_deleted,
        samples_scrubbed=outcome.samples_scrubbed,
        unsent_adds_dropped=outcome.unsent_adds_dropped,
    )
    return outcome


async def _queue_removes(
    conn: Any,
    batch: Identifiers,
    source: Source,
    chunk_size: int,
    run_id: int | None,
    outcome: Forgotten,
) -> None:
    """A plan with remove chunks in every linked segment of the type, and the proof rows."""
    targets = await conn.fetch(query("erasure_targets"), batch.identifier_type)
    if not targets:
        await conn.execute(
            query("record_erasures_without_segment"), batch.identifier_type, batch.keys, source
        )
    await conn.execute(query("plan_net_table"))
    for link in targets:
        plan_id = await conn.fetchval(query("create_plan"), run_id, link["segment_key"])
        held = await conn.fetchval(
            query("erasure_removes"),
            plan_id,
            link["segment_key"],
            batch.identifier_type,
            link["send_as"],
            link["api"],
            link["criteo_segment_id"],
            batch.canons,
            batch.keys,
            source,
        )
        row = await mirror.chunk_net(conn, plan_id, link, chunk_size)
        await conn.execute(query("record_plan"), plan_id, 0, 0, 0, row["removes"], row["chunks"], 0)
        outcome.segments.append(
            ErasedIn(
                segment_key=link["segment_key"],
                api=link["api"],
                criteo_segment_id=link["criteo_segment_id"],
                send_as=link["send_as"],
                plan_id=plan_id,
                removes=row["removes"],
                held=held,
            )
        )


async def _delete_copies(conn: Any, batch: Identifiers, outcome: Forgotten) -> None:
    """Every plain copy: matched on the canonical form and on the key (a pre-hashed copy,
    and every form a link sends, hashed or not)."""
    forms = sorted(set(batch.canons) | set(batch.keys))
    name = batch.identifier_type
    outcome.inbox_deleted = _count(await conn.execute(query("delete_inbox_copies"), name, forms))
    outcome.rejected_deleted = _count(
        await conn.execute(query("delete_rejected_copies"), name, forms)
    )
    outcome.samples_scrubbed = _count(await conn.execute(query("scrub_audit_samples"), forms))
    outcome.unsent_adds_dropped = await conn.fetchval(query("drop_unsent_adds"), name, forms)


def _count(status: str) -> int:
    """The row count of a command status ("DELETE 3", "UPDATE 0")."""
    return int(status.rsplit(maxsplit=1)[-1])


@dataclass
class Withdrawals:
    processed: int = 0
    refused: int = 0


async def process_withdrawals(conn: Any, chunk_size: int, run_id: int | None) -> Withdrawals:
    """Each waiting consent withdrawal as a forget; the rows are deleted (the plain value
    with them). One that cannot be acted on is refused: recorded without its value, said
    in the log and in `syncd status`, so the CRM can send it again."""
    done = Withdrawals()
    for row in await conn.fetch(query("withdrawal_types")):
        spelt = row["identifier_type"]
        found = find_type(spelt)
        if found is None:
            ids = await conn.fetch(query("refuse_withdrawals_of_type"), spelt)
            for refused in ids:
                _log_refused(refused["withdrawal_id"], None, "unknown_identifier_type")
            done.refused += len(ids)
            continue
        while True:
            taken = _Taker(conn, spelt, found.name)
            outcome = await forget_batch(
                conn,
                Identifiers(found.name, [], [], []),
                "consent_withdrawal",
                chunk_size,
                run_id,
                taken=taken,
            )
            done.processed += outcome.identifiers
            done.refused += taken.refused
            if taken.rows < WITHDRAWAL_BATCH:
                break
    if done.processed or done.refused:
        log.info("consent_withdrawals_processed", processed=done.processed, refused=done.refused)
    return done


class _Taker:
    """Takes a batch of withdrawals of one type inside the forget's transaction: the valid
    ones become the batch, the others are recorded as refused."""

    def __init__(self, conn: Any, spelt: str, name: str) -> None:
        self.conn, self.spelt, self.name = conn, spelt, name
        self.rows = 0
        self.refused = 0

    async def __call__(self) -> Identifiers:
        rows = await self.conn.fetch(
            query("take_withdrawals"), self.spelt, self.name, WITHDRAWAL_BATCH
        )
        self.rows = len(rows)
        bad = [r for r in rows if r["problem"] is not None]
        if bad:
            await self.conn.execute(
                query("record_refusals"),
                [r["id"] for r in bad],
                self.name,
                [r["problem"] for r in bad],
                [r["received_at"] for r in bad],
            )
            for r in bad:
                _log_refused(r["id"], self.name, r["problem"])
        self.refused = len(bad)
        good = [r for r in rows if r["problem"] is None]
        return Identifiers(
            self.name,
            [r["canon"] for r in good],
            [r["hashed"] for r in good],
            [r["reason"] or "consent withdrawn" for r in good],
        )


def _log_refused(withdrawal_id: int, identifier_type: str | None, problem: str) -> None:
    log.warning(
        "consent_withdrawal_refused",
        withdrawal_id=withdrawal_id,
        identifier_type=identifier_type,
        problem=problem,
    )


async def erasure_report(conn: Any, raw: str, identifier_type: str) -> tuple[Any, list[Any]]:
    """`syncd forget --report`: the identifier's suppression (or None) and, per forget and
    segment, the remove's acknowledgement or what it waits for."""
    name = type_name(identifier_type)
    _, key = await normalise_one(conn, raw, name)
    suppression = await conn.fetchrow(query("suppression_of"), name, key)
    return suppression, list(await conn.fetch(query("erasure_report"), name, key))


async def remove_suppression(conn: Any, raw: str, identifier_type: str) -> Any:
    """`syncd suppressions remove`: consent given again. The removed row, or None."""
    name = type_name(identifier_type)
    _, key = await normalise_one(conn, raw, name)
    row = await conn.fetchrow(query("remove_suppression"), name, key)
    if row is not None:
        log.info("suppression_removed", identifier_type=name)
    return row


async def list_suppressions(conn: Any) -> list[Any]:
    return list(await conn.fetch(query("list_suppressions")))
