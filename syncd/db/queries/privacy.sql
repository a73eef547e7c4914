-- Privacy: forget (erasure), suppressions, consent withdrawals, the proof (sql/0016_privacy.sql).
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...
-- No statement here returns or stores a plain identifier except identifier_keys and
-- take_withdrawals, which hand the canonical form to the forget of the same transaction.

-- name: identifier_keys
-- Normalise raw identifiers ($1, one type $2) as any change is: their canonical form, why
-- they cannot be sent (NULL: they can), and their suppression key (sql/0016).
SELECT x.canon, syncd.identifier_problem(x.canon, $2) AS problem,
    syncd.suppression_key(syncd.identifier_to_send(x.canon, $2, 'sha256'), $2, 'sha256')
        AS hashed
FROM unnest($1::text[]) WITH ORDINALITY AS r(raw, ord)
CROSS JOIN LATERAL (SELECT syncd.canonical_identifier(r.raw, $2) AS canon) x
ORDER BY r.ord;

-- name: erasure_targets
-- Every linked segment of the type ($1): a forget queues a remove in each (a remove of a
-- non-member is harmless at Criteo, and the ledger only knows what syncd acknowledged).
-- Locked like a plan locks its link: a re-link waits for the forget, then sees its chunks.
SELECT segment_key, api, criteo_segment_id, identifier_type, send_as, account_id,
    gum_caller_id, app
FROM syncd.segments WHERE identifier_type = $1
ORDER BY segment_key
FOR SHARE;

-- name: linked_segment_keys
-- The keys whose plan lock a forget of type $1 takes first (in this order: no deadlock).
SELECT segment_key FROM syncd.segments WHERE identifier_type = $1 ORDER BY segment_key;

-- name: erasure_removes
-- One segment's removes for a forget, into plan_net (emptied first: one forget writes the
-- plans of several segments in its transaction), for chunk_net to cut into the plan $1
-- made for it: each identifier as this link sends it ($4 send_as); and the proof rows
-- (whether the ledger held it). $2 key, $3 type, $5, $6 the target (api, Criteo id),
-- $7 canonical identifiers, $8 their suppression keys, $9 source.
WITH emptied AS (
    DELETE FROM plan_net RETURNING 1
), batch AS (
    SELECT syncd.identifier_to_send(b.canon, $3, $4) COLLATE "C" AS value, b.hashed
    FROM unnest($7::text[], $8::text[]) AS b(canon, hashed)
), target AS (
    SELECT id FROM syncd.ledger_targets WHERE api = $5 AND criteo_segment_id = $6
), proof AS (
    INSERT INTO syncd.erasures (identifier_type, hashed_identifier, source, plan_id,
                                segment_key, api, criteo_segment_id, held_in_ledger)
    SELECT $3, batch.hashed, $9, $1, $2, $5, $6, EXISTS (
        SELECT 1 FROM syncd.ledger l JOIN target t ON l.target_id = t.id
        WHERE l.identifier = syncd.ledger_pack(batch.value))
    FROM batch
    RETURNING held_in_ledger
), net AS (
    INSERT INTO plan_net (value, is_add) SELECT DISTINCT value, false FROM batch
    RETURNING 1
)
-- (emptied runs whether read or not: a data-modifying CTE always does, on the snapshot
-- from before the statement, so it never sees net's rows.)
SELECT (SELECT count(*) FROM proof WHERE held_in_ledger) AS held;

-- name: record_erasures_without_segment
-- A forget while no segment of the type ($1) is linked: the proof says so.
INSERT INTO syncd.erasures (identifier_type, hashed_identifier, source)
SELECT $1, h, $3 FROM unnest($2::text[]) AS h;

-- name: suppress
-- Suppress identifiers (their keys $2, type $1, reasons $3, source $4); one already
-- suppressed keeps its row. Returns how many are new.
WITH added AS (
    INSERT INTO syncd.suppressions (identifier_type, hashed_identifier, reason, source)
    SELECT $1, h, coalesce(r, 'erasure requested'), $4
    FROM unnest($2::text[], $3::text[]) AS s(h, r)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM added;

-- name: delete_inbox_copies
-- Plain copies in the inbox: every change, of any segment key (linked or not) and any
-- type, whose identifier normalises (as type $1) to one of $2 (canonical forms and keys,
-- so a pre-hashed copy goes too). One scan of the inbox, hashing $2 once.
DELETE FROM syncd.membership_changes m
USING (SELECT DISTINCT unnest($2::text[]) AS v) forgotten
WHERE syncd.canonical_identifier(m.identifier, $1) = forgotten.v;

-- name: delete_rejected_copies
-- Plain copies among the rejected identifiers, compared the same way.
DELETE FROM syncd.rejected_identifiers r
USING (SELECT DISTINCT unnest($2::text[]) AS v) forgotten
WHERE syncd.canonical_identifier(r.identifier, $1) = forgotten.v;

-- name: scrub_audit_samples
-- Criteo's samples of invalid identifiers (as sent) in the audit: the forgotten values
-- ($1: canonical forms and keys, which are every form syncd sends) taken out.
UPDATE syncd.push_audit a
SET sample_invalid_identifiers = (
    SELECT coalesce(jsonb_agg(e), '[]'::jsonb)
    FROM jsonb_array_elements(a.sample_invalid_identifiers) e
    WHERE NOT (e #>> '{}' = ANY($1::text[]))
)
WHERE jsonb_typeof(a.sample_invalid_identifiers) = 'array'
  AND a.sample_invalid_identifiers ?| $1::text[];

-- name: drop_unsent_adds
-- Adds of the forgotten identifiers ($2: every form sent) that no push has started
-- (pending or failed chunks of type $1) are taken out of their chunk: an add for a
-- suppressed identifier is never sent, even one planned before the forget. A chunk left
-- empty is done (nothing to send, nothing to fold). Claimed chunks are in flight: the
-- forget's remove follows them (a later plan). Returns the chunks changed.
WITH hit AS (
    SELECT c.id,
        json_agg(e) FILTER (WHERE NOT (e = ANY($2::text[]))) AS kept,
        count(*) FILTER (WHERE NOT (e = ANY($2::text[]))) AS n
    FROM syncd.chunks c,
        json_array_elements_text(convert_from(c.payload, 'UTF8')::json) AS e
    WHERE c.state IN ('pending', 'failed') AND c.operation = 'add' AND c.identifier_type = $1
    GROUP BY c.id
    HAVING bool_or(e = ANY($2::text[]))
), changed AS (
    UPDATE syncd.chunks c
    SET payload = CASE WHEN hit.n = 0 THEN NULL ELSE convert_to(hit.kept::text, 'UTF8') END,
        identifier_count = hit.n,
        state = CASE WHEN hit.n = 0 THEN 'done' ELSE c.state END,
        done_at = CASE WHEN hit.n = 0 THEN now() ELSE c.done_at END
    FROM hit
    WHERE c.id = hit.id AND c.state IN ('pending', 'failed')
    RETURNING 1
)
SELECT count(*) FROM changed;

-- name: list_suppressions
-- The suppression list, newest first (keys only: no plain value is stored).
SELECT identifier_type, hashed_identifier, reason, source, created_at
FROM syncd.suppressions ORDER BY created_at DESC, identifier_type, hashed_identifier;

-- name: remove_suppression
-- Consent given again: the identifier may be added again. The erasure proof stays.
DELETE FROM syncd.suppressions WHERE identifier_type = $1 AND hashed_identifier = $2
RETURNING created_at, reason;

-- name: suppression_of
-- One identifier's suppression, if any.
SELECT created_at, reason, source FROM syncd.suppressions
WHERE identifier_type = $1 AND hashed_identifier = $2;

-- name: erasure_report
-- The proof for one identifier (type $1, key $2): per forget and segment, the remove's
-- acknowledgement (the audit row's Criteo request date) or what it waits for.
SELECT e.requested_at, e.source, e.segment_key, e.api, e.criteo_segment_id,
    e.held_in_ledger, e.plan_id, ack.request_date, ack.acknowledged_at,
    open.state AS open_state, open.attempts, open.available_at, open.last_error,
    EXISTS (SELECT 1 FROM syncd.chunks c WHERE c.plan_id = e.plan_id
            AND c.segment_key = e.segment_key) AS chunk_known
FROM syncd.erasures e
LEFT JOIN LATERAL (
    SELECT max(a.request_date) AS request_date, max(a.finished_at) AS acknowledged_at
    FROM syncd.push_audit a
    WHERE a.plan_id = e.plan_id AND a.segment_key = e.segment_key
      AND a.operation = 'remove' AND a.outcome = 'acknowledged'
) ack ON true
LEFT JOIN LATERAL (
    SELECT c.state, c.attempts, c.available_at, c.last_error
    FROM syncd.chunks c
    WHERE c.plan_id = e.plan_id AND c.segment_key = e.segment_key AND c.state <> 'done'
    ORDER BY c.id LIMIT 1
) open ON true
WHERE e.identifier_type = $1 AND e.hashed_identifier = $2
ORDER BY e.requested_at DESC, e.segment_key NULLS FIRST;

-- name: withdrawal_types
-- The identifier types (as the CRM spelt them) of the withdrawals waiting.
SELECT DISTINCT identifier_type FROM syncd.consent_withdrawals ORDER BY 1;

-- name: take_withdrawals
-- Take (delete) up to $3 waiting withdrawals of type $1 (as spelt), normalised as type $2:
-- their canonical form, problem and key for the forget in the same transaction. SKIP
-- LOCKED: two replicas never take one row twice.
WITH taken AS (
    DELETE FROM syncd.consent_withdrawals w
    WHERE w.id IN (
        SELECT id FROM syncd.consent_withdrawals WHERE identifier_type = $1
        ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED
    )
    RETURNING w.id, w.identifier, w.reason, w.received_at
)
SELECT t.id, t.reason, t.received_at, x.canon, syncd.identifier_problem(x.canon, $2) AS problem,
    syncd.suppression_key(syncd.identifier_to_send(x.canon, $2, 'sha256'), $2, 'sha256')
        AS hashed
FROM taken t
CROSS JOIN LATERAL (SELECT syncd.canonical_identifier(t.identifier, $2) AS canon) x
ORDER BY t.id;

-- name: refuse_withdrawals_of_type
-- Withdrawals naming a type syncd does not know ($1 as spelt): deleted (they hold a plain
-- value) and recorded, without it, as refused. Returns their ids.
WITH taken AS (
    DELETE FROM syncd.consent_withdrawals
    WHERE identifier_type = $1
    RETURNING id, received_at
)
INSERT INTO syncd.consent_withdrawal_refusals (withdrawal_id, identifier_type, problem, received_at)
SELECT id, NULL, 'unknown_identifier_type', received_at FROM taken
RETURNING withdrawal_id;

-- name: record_refusals
-- Withdrawals of a known type ($2) whose value is no identifier: recorded without it
-- ($1 ids, $3 problems, $4 when received).
INSERT INTO syncd.consent_withdrawal_refusals (withdrawal_id, identifier_type, problem, received_at)
SELECT id, $2, problem, received_at
FROM unnest($1::bigint[], $3::text[], $4::timestamptz[]) AS r(id, problem, received_at);

-- name: consent_status
-- For `syncd status`: withdrawals waiting for a run, and those refused in the last $1 days
-- per type and problem.
SELECT 'waiting' AS kind, NULL AS identifier_type, NULL AS problem, count(*) AS withdrawals,
    min(received_at) AS oldest
FROM syncd.consent_withdrawals
HAVING count(*) > 0
UNION ALL
SELECT 'refused', identifier_type, problem, count(*), min(received_at)
FROM syncd.consent_withdrawal_refusals
WHERE refused_at > now() - make_interval(days => $1)
GROUP BY identifier_type, problem;
