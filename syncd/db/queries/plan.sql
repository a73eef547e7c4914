-- Plan: the inbox's visible changes into netted chunks, one segment per transaction.
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...

-- name: segments_to_plan
-- Linked segments a run plans: every mirror link (its source is diffed each run), and the
-- change-log links that have changes visible in the inbox. One index probe per segment
-- (LIMIT 1), where EXISTS would read the whole inbox to build a hash of its keys. Changes
-- in the inbox for a mirror-linked key wait (syncd status says so).
-- A run plans each key with its link as lock_link_for_plan reads it then, not as here.
SELECT s.segment_key, s.api, s.criteo_segment_id, s.identifier_type, s.send_as,
    s.account_id, s.gum_caller_id, s.app, s.mirror_relation, s.removals_approved
FROM syncd.segments s
WHERE s.mirror_relation IS NOT NULL
   OR (SELECT true FROM syncd.membership_changes m WHERE m.segment_key = s.segment_key LIMIT 1)
ORDER BY s.segment_key;

-- name: lock_segment_plan
-- Plans of one segment are serialised, so plan ids order a segment's changes. A session
-- lock, taken before the plan's transaction begins, so that the transaction's snapshot
-- already sees what the previous plan of the segment consumed.
SELECT pg_advisory_lock(hashtext('syncd.plan'), hashtext($1));

-- name: unlock_segment_plan
-- After the plan's transaction ended (the pool also drops every advisory lock on release).
SELECT pg_advisory_unlock(hashtext('syncd.plan'), hashtext($1));

-- name: lock_link_for_plan
-- The first statement of a plan's transaction: the link it plans for, locked until the
-- plan commits, so that a link change (which takes FOR UPDATE) waits for the plan and
-- then sees its chunks. No row: the key was unlinked since the run listed it.
SELECT segment_key, api, criteo_segment_id, identifier_type, send_as, account_id,
    gum_caller_id, app, mirror_relation, removals_approved
FROM syncd.segments WHERE segment_key = $1
FOR SHARE;

-- name: plan_work_mem
-- Netting and chunking a large segment sort in memory: room enough not to spill to disk.
SET LOCAL work_mem = '256MB';

-- name: create_plan
-- The plan row a segment's chunks hang from.
INSERT INTO syncd.plans (run_id, segment_key) VALUES ($1, $2) RETURNING id;

-- name: plan_segment
-- Turn a segment's visible changes into netted chunks, in one statement, in a
-- REPEATABLE READ transaction that then deletes exactly the rows this statement read
-- (consume_segment: same snapshot, so a late-committed row is neither read nor deleted,
-- and a later plan takes it, whatever its id). Reading with SELECT and deleting with a
-- plain DELETE costs a fifth less than one DELETE ... RETURNING feeding the rest.
--   normalise each identifier; record the rejected ones; net per value sent, the highest
--   id winning; leave out the adds of suppressed identifiers (counted); cut the net
--   operations into chunks of at most $6 identifiers.
-- Netting packs (id, operation) into one bigint, id * 2 + (1 for add), so one aggregate
-- finds the latest operation per value.
-- $1 plan id, $2 segment key, $3 identifier type, $4 send_as, $5 run id, $6 chunk size;
-- the rest of the target each chunk records: $7 api, $8 Criteo segment id, $9 account id,
-- $10 gum caller id.
WITH normalised AS (
    -- OFFSET 0 keeps canon a computed column: the normalisation functions below are
    -- then inlined (PostgreSQL will not inline a function whose argument is an
    -- expression it would have to evaluate more than once).
    SELECT id, identifier, operation, changed_at, canon,
        syncd.identifier_problem(canon, $3) AS reason
    FROM (
        SELECT id, identifier, operation, changed_at,
            syncd.canonical_identifier(identifier, $3) AS canon
        FROM syncd.membership_changes
        WHERE segment_key = $2
        OFFSET 0
    ) AS visible
), rejected AS (
    INSERT INTO syncd.rejected_identifiers
        (run_id, plan_id, change_id, segment_key, identifier, operation, reason, changed_at)
    SELECT $5, $1, id, $2, identifier, operation, reason, changed_at
    FROM normalised WHERE reason IS NOT NULL
    RETURNING 1
), net AS (
    -- COLLATE "C": values are compared byte for byte, never through the locale.
    SELECT syncd.identifier_to_send(canon, $3, $4) COLLATE "C" AS value,
        max(id * 2 + (operation = 'add')::int) % 2 = 1 AS is_add
    FROM normalised
    WHERE reason IS NULL
    GROUP BY 1
), screened AS (
    -- A net add of a suppressed identifier is never sent (its change is consumed all the
    -- same, and counted); removes always go. The list is hashed once for the statement
    -- (a hashed subplan) and each add probes it: an empty list costs next to nothing.
    SELECT value, is_add,
        is_add AND syncd.suppression_key(value, $3, $4) IN (
            SELECT hashed_identifier FROM syncd.suppressions WHERE identifier_type = $3
        ) AS suppressed
    FROM net
), numbered AS (
    -- A running count per operation, in scan order: no sort needed to number the rows.
    SELECT value, is_add,
        (CASE WHEN is_add THEN count(*) FILTER (WHERE is_add) OVER running
              ELSE count(*) FILTER (WHERE NOT is_add) OVER running END - 1) / $6 AS chunk_no
    FROM screened
    WHERE NOT suppressed
    WINDOW running AS (ROWS UNBOUNDED PRECEDING)
), chunks AS (
    -- The payload is stored as the bytes sent: a UTF-8 JSON array (see push.py).
    -- json_agg writes it directly, at 0.3 CPU-s per million identifiers where
    -- array_to_json(array_agg()) takes 0.8 (it builds the array first).
    INSERT INTO syncd.chunks (plan_id, segment_key, operation, identifier_type, payload,
                              identifier_count, api, criteo_segment_id, account_id,
                              gum_caller_id, send_as, app)
    SELECT $1, $2, CASE WHEN is_add THEN 'add' ELSE 'remove' END, $3,
        convert_to(json_agg(value)::text, 'UTF8'), count(*), $7, $8, $9, $10, $4, $11
    FROM numbered
    GROUP BY is_add, chunk_no
    RETURNING operation, identifier_count
)
SELECT
    (SELECT count(*) FROM normalised) AS changes_consumed,
    (SELECT count(*) FROM rejected) AS rejected,
    (SELECT count(*) FROM screened WHERE suppressed) AS suppressed,
    coalesce(sum(identifier_count) FILTER (WHERE operation = 'add'), 0) AS adds,
    coalesce(sum(identifier_count) FILTER (WHERE operation = 'remove'), 0) AS removes,
    count(*) AS chunks
FROM chunks;

-- name: consume_segment
-- The second half of a plan: delete the rows plan_segment read (see there).
DELETE FROM syncd.membership_changes WHERE segment_key = $1;

-- name: record_plan
-- Store what a plan consumed and produced.
UPDATE syncd.plans
SET changes_consumed = $2, rejected = $3, adds = $4, removes = $5, chunks = $6,
    suppressed = $7
WHERE id = $1;
