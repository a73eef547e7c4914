-- Mirror links (sql/0014_mirror.sql): a segment's membership read from a CRM relation and
-- diffed against the ledger, all in PostgreSQL; and the mass-removal guard's counts.
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...

-- name: mirror_relation_columns
-- What linking (and each plan) checks a mirror relation for: it exists, it is something
-- rows can be read from, syncd may read it, and its two columns and their types. No row:
-- no such relation. $1: the name as the user wrote it, or as stored.
SELECT c.oid::regclass::text AS resolved, c.relkind::text AS kind,
    has_table_privilege(c.oid, 'SELECT') AS readable,
    (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
     WHERE a.attrelid = c.oid AND a.attname = 'segment_key' AND a.attnum > 0
       AND NOT a.attisdropped) AS segment_key_type,
    (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
     WHERE a.attrelid = c.oid AND a.attname = 'identifier' AND a.attnum > 0
       AND NOT a.attisdropped) AS identifier_type
FROM pg_class c WHERE c.oid = to_regclass($1);

-- name: plan_net_table
-- What a plan sends, one row per value, for chunk_net to cut: a mirror diff, a resync's
-- members, a forget's removes. Dropped at commit: nothing of a segment's membership outlives
-- its plan's transaction. IF NOT EXISTS: a forget writes the plans of several segments in
-- one transaction (each empties it first).
CREATE TEMPORARY TABLE IF NOT EXISTS plan_net (value text COLLATE "C", is_add boolean)
ON COMMIT DROP;

-- name: mirror_diff
-- The mirror's rows of the key ($2 in relation $7), normalised, validated and hashed exactly
-- as inbox changes are (plan_segment), against what Criteo has of the target ($5 api, $6
-- segment id): the ledger, then the target's chunks not folded into it yet (open, or
-- acknowledged since the last fold), in plan order. Both ways by hash anti-join; the
-- difference goes to plan_net. $8 true (a resync after a clear): nothing is on Criteo,
-- every member is an add. New rejected values are recorded (plan $1, run $4; identifier
-- type $3, send_as $9). Returns the rows read, the rejections recorded and the members
-- before.
WITH normalised AS (
    SELECT identifier, canon, syncd.identifier_problem(canon, $3) AS reason
    FROM (
        -- OFFSET 0: canon stays a computed column, so the functions are inlined (plan.sql).
        SELECT identifier, syncd.canonical_identifier(identifier, $3) AS canon
        FROM syncd.mirror_members($7::text::regclass, $2) AS m(identifier)
        OFFSET 0
    ) AS source
), rejected AS (
    INSERT INTO syncd.rejected_identifiers
        (run_id, plan_id, change_id, segment_key, identifier, operation, reason, changed_at)
    SELECT DISTINCT ON (n.identifier) $4::bigint, $1::bigint, NULL::bigint, $2, n.identifier,
        'add', n.reason, NULL::timestamptz
    FROM normalised n
    WHERE n.reason IS NOT NULL
      AND $4::bigint IS NOT NULL  -- a resync (no run) leaves them to the next run's diff
      AND NOT EXISTS (
          SELECT 1 FROM syncd.rejected_identifiers r
          WHERE r.segment_key = $2 AND r.change_id IS NULL
            AND r.identifier IS NOT DISTINCT FROM n.identifier)
    RETURNING 1
), sent AS (
    SELECT identifier AS raw, v.value, syncd.ledger_pack(v.value) AS packed
    FROM (SELECT identifier, CASE WHEN reason IS NULL
                 THEN syncd.identifier_to_send(canon, $3, $9) END AS value
          FROM normalised OFFSET 0) AS v
), desired AS (
    -- Not de-duplicated: an anti-join needs no unique input, and de-duplicating the whole
    -- membership first (a sort of 1M rows) cost more than the diff's adds (below) do.
    SELECT value, packed FROM sent WHERE value IS NOT NULL
), cache_cleared AS (
    DELETE FROM syncd.mirror_rows WHERE segment_key = $2
    RETURNING 1
), cache_filled AS (
    -- The rows as diffed, for the next diff to start from (sql/0017_mirror_rows.sql); not
    -- seen by the DELETE above (one snapshot), nor for a resync (no run: $4 NULL).
    INSERT INTO syncd.mirror_rows (segment_key, raw, packed)
    SELECT $2, raw, packed FROM sent WHERE raw IS NOT NULL AND $4::bigint IS NOT NULL
    RETURNING 1
), baseline AS (
    SELECT packed FROM syncd.target_members($5, $6) WHERE NOT $8
), net AS (
    INSERT INTO plan_net (value, is_add)
    SELECT DISTINCT ON (d.packed) d.value, true FROM desired d
    WHERE NOT EXISTS (SELECT 1 FROM baseline b WHERE b.packed = d.packed)
    UNION ALL
    SELECT syncd.ledger_unpack(b.packed), false FROM baseline b
    WHERE NOT EXISTS (SELECT 1 FROM desired d WHERE d.packed = b.packed)
    RETURNING 1
)
SELECT (SELECT count(*) FROM normalised) AS rows_read,
    (SELECT count(*) FROM rejected) AS rejected,  -- newly: a source keeps its bad rows
    (SELECT count(*) FROM baseline) AS members,
    (SELECT count(*) FROM net) AS differences,
    (SELECT count(*) FROM cache_cleared) + (SELECT count(*) FROM cache_filled) AS cached;

-- name: mirror_incremental
-- Whether the key's next diff may start from syncd.mirror_rows (sql/0017_mirror_rows.sql):
-- the same target ($2 api, $3 segment id) and relation ($4), no chunk of a later plan for
-- the target, no other key linked to it, the same suppressions of the type ($5), and a
-- full diff less than $6 hours old. No row: never diffed (or state dropped).
SELECT s.api = $2 AND s.criteo_segment_id = $3 AND s.relation = $4
    AND s.full_at > now() - make_interval(hours => $6)
    AND s.suppressions = (SELECT count(*) FROM syncd.suppressions WHERE identifier_type = $5)
    AND s.suppressed_at IS NOT DISTINCT FROM (
        SELECT max(created_at) FROM syncd.suppressions WHERE identifier_type = $5)
    AND NOT EXISTS (
        SELECT 1 FROM syncd.chunks c
        WHERE c.api = $2 AND c.criteo_segment_id = $3 AND c.plan_id > s.plan_id)
    -- Plans of the key are serialised (its plan lock: mirror plans, forgets, resyncs), so
    -- their ids order them; another key's plan for the same Criteo segment could commit
    -- with an earlier id after this state was written: no incremental diff then.
    AND NOT EXISTS (
        SELECT 1 FROM syncd.segments o
        WHERE o.api = $2 AND o.criteo_segment_id = $3 AND o.segment_key <> $1)
    AS incremental
FROM syncd.mirror_state s WHERE s.segment_key = $1;

-- name: record_mirror_state
-- After a mirror plan ($2): what its diff started from, for the next one to check. $7 true:
-- the diff was full.
INSERT INTO syncd.mirror_state AS m (segment_key, api, criteo_segment_id, relation, plan_id,
                                     suppressions, suppressed_at, full_at)
SELECT $1, $3, $4, $5, $2, count(*), max(created_at), now()
FROM syncd.suppressions WHERE identifier_type = $6
ON CONFLICT (segment_key) DO UPDATE
SET api = EXCLUDED.api, criteo_segment_id = EXCLUDED.criteo_segment_id,
    relation = EXCLUDED.relation, plan_id = EXCLUDED.plan_id,
    suppressions = EXCLUDED.suppressions, suppressed_at = EXCLUDED.suppressed_at,
    full_at = CASE WHEN $7 THEN EXCLUDED.full_at ELSE m.full_at END;

-- name: forget_mirror_state
-- The next diff of the key is full (a resync queued plans the state does not know of).
DELETE FROM syncd.mirror_state WHERE segment_key = $1;

-- name: mirror_delta
-- An incremental diff (mirror_incremental said so): the source rows of the key ($2 in
-- relation $5) against syncd.mirror_rows, one hash join on the raw text. Only the rows new
-- since the last diff are normalised, validated and hashed (as mirror_diff does; new
-- rejections recorded: plan $1, run $4, type $3, send_as $6); the rows gone leave the
-- cache. A value is added when no row had it before and removed when no row has it now
-- (two spellings of one member are one member). Writes plan_net; returns what
-- mirror_diff returns.
WITH source AS (
    SELECT identifier AS raw, true AS present
    FROM syncd.mirror_members($5::text::regclass, $2) AS m(identifier)
), cache AS (
    SELECT ctid AS row_id, raw, packed FROM syncd.mirror_rows WHERE segment_key = $2
), joined AS (
    SELECT s.present, s.raw AS new_raw, c.row_id, c.packed
    FROM source s FULL JOIN cache c ON c.raw = s.raw
), normalised AS (
    SELECT identifier, canon, syncd.identifier_problem(canon, $3) AS reason
    FROM (
        SELECT identifier, syncd.canonical_identifier(identifier, $3) AS canon
        FROM (SELECT DISTINCT new_raw AS identifier FROM joined
              WHERE present AND row_id IS NULL) AS fresh
        OFFSET 0
    ) AS f
), rejected AS (
    INSERT INTO syncd.rejected_identifiers
        (run_id, plan_id, change_id, segment_key, identifier, operation, reason, changed_at)
    SELECT $4::bigint, $1::bigint, NULL::bigint, $2, n.identifier, 'add', n.reason,
        NULL::timestamptz
    FROM normalised n
    WHERE n.reason IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM syncd.rejected_identifiers r
          WHERE r.segment_key = $2 AND r.change_id IS NULL
            AND r.identifier IS NOT DISTINCT FROM n.identifier)
    RETURNING 1
), fresh AS (
    SELECT identifier AS raw, syncd.ledger_pack(v.value) AS packed
    FROM (SELECT identifier, CASE WHEN reason IS NULL
                 THEN syncd.identifier_to_send(canon, $3, $6) END AS value
          FROM normalised OFFSET 0) AS v
), cache_in AS (
    INSERT INTO syncd.mirror_rows (segment_key, raw, packed)
    SELECT $2, raw, packed FROM fresh WHERE raw IS NOT NULL
    RETURNING 1
), cache_out AS (
    DELETE FROM syncd.mirror_rows
    WHERE ctid = ANY (ARRAY(SELECT row_id FROM joined WHERE present IS NULL))
    RETURNING 1
), candidates AS (
    -- The values that may have come or gone: the new rows' and the gone rows'. Only these
    -- are looked up among the other rows (one pass with a small hash, not a join of 1M).
    SELECT packed FROM fresh WHERE packed IS NOT NULL
    UNION
    SELECT packed FROM joined WHERE present IS NULL AND packed IS NOT NULL
), held AS (
    -- Of those, the ones a row had before this diff; `still`: a row still has it.
    SELECT packed, bool_or(present IS NOT NULL) AS still
    FROM joined
    WHERE row_id IS NOT NULL AND packed IN (SELECT packed FROM candidates)
    GROUP BY packed
), adds AS (
    SELECT DISTINCT f.packed FROM fresh f
    WHERE f.packed IS NOT NULL AND NOT EXISTS (SELECT 1 FROM held h WHERE h.packed = f.packed)
), removes AS (
    SELECT h.packed FROM held h
    WHERE NOT h.still AND NOT EXISTS (SELECT 1 FROM fresh f WHERE f.packed = h.packed)
), net AS (
    INSERT INTO plan_net (value, is_add)
    SELECT syncd.ledger_unpack(packed), true FROM adds
    UNION ALL
    SELECT syncd.ledger_unpack(packed), false FROM removes
    RETURNING 1
)
SELECT (SELECT count(*) FROM source) AS rows_read,
    (SELECT count(*) FROM rejected) AS rejected,
    -- What Criteo has of the target: by the conditions of an incremental diff, the
    -- members as last diffed (suppressed ones apart).
    (SELECT count(*) FROM joined WHERE row_id IS NOT NULL AND packed IS NOT NULL) AS members,
    (SELECT count(*) FROM net) AS differences,
    (SELECT count(*) FROM cache_in) + (SELECT count(*) FROM cache_out) AS cached;

-- name: rebuild_from_ledger
-- A change-log link's resync: every member Criteo has of the target ($1 api, $2 segment
-- id), as adds (the clear before them empties the list).
INSERT INTO plan_net (value, is_add)
SELECT syncd.ledger_unpack(packed), true FROM syncd.target_members($1, $2);

-- name: target_size
-- How many members Criteo has of a target ($1 api, $2 segment id) as syncd knows it: the
-- ledger with the chunks still on their way (what a resync would rebuild).
SELECT count(*) FROM syncd.target_members($1, $2);

-- name: chunk_net
-- Cut plan_net into chunks of at most $6 identifiers, one operation each, as plan_segment
-- does (which writes its chunks in the statement that nets, the hot path of change logs).
-- An add of a suppressed identifier (syncd.suppressions, by the key every send_as shares)
-- is left out and counted, as plan_segment does: a mirror source or a resync that still
-- lists a person who was forgotten never re-adds them. Removes always go.
-- $1 plan, $2 key, $3 identifier type, $4 send_as, $5 app, $7 api, $8 segment id,
-- $9 account id, $10 gum caller id.
WITH screened AS (
    SELECT value, is_add,
        is_add AND syncd.suppression_key(value, $3, $4) IN (
            SELECT hashed_identifier FROM syncd.suppressions WHERE identifier_type = $3
        ) AS suppressed
    FROM plan_net
), numbered AS (
    SELECT value, is_add,
        (CASE WHEN is_add THEN count(*) FILTER (WHERE is_add) OVER running
              ELSE count(*) FILTER (WHERE NOT is_add) OVER running END - 1) / $6 AS chunk_no
    FROM screened
    WHERE NOT suppressed
    WINDOW running AS (ROWS UNBOUNDED PRECEDING)
), chunks AS (
    INSERT INTO syncd.chunks (plan_id, segment_key, operation, identifier_type, payload,
                              identifier_count, api, criteo_segment_id, account_id,
                              gum_caller_id, send_as, app)
    SELECT $1, $2, CASE WHEN is_add THEN 'add' ELSE 'remove' END, $3,
        convert_to(json_agg(value)::text, 'UTF8'), count(*), $7, $8, $9, $10, $4, $5
    FROM numbered
    GROUP BY is_add, chunk_no
    RETURNING operation, identifier_count
)
SELECT coalesce(sum(identifier_count) FILTER (WHERE operation = 'add'), 0) AS adds,
    coalesce(sum(identifier_count) FILTER (WHERE operation = 'remove'), 0) AS removes,
    count(*) AS chunks,
    (SELECT count(*) FROM screened WHERE suppressed) AS suppressed
FROM chunks;

-- name: acknowledged_members
-- The guard's denominator for a change-log plan: how many identifiers Criteo has
-- acknowledged in the target ($1 api, $2 segment id), from the ledger's primary key.
SELECT count(*) FROM syncd.ledger
WHERE target_id = (SELECT id FROM syncd.ledger_targets
                   WHERE api = $1 AND criteo_segment_id = $2);

-- name: removals_of_members
-- The guard's numerator for a change-log plan ($1) whose removes outnumber the share
-- allowed: how many of them remove an acknowledged member (a remove of a value Criteo
-- never had removes nothing). Only then: it reads the plan's remove payloads again.
SELECT count(*)
FROM syncd.chunks c, json_array_elements_text(convert_from(c.payload, 'UTF8')::json) AS e(v)
WHERE c.plan_id = $1 AND c.operation = 'remove'
  AND EXISTS (
      SELECT 1 FROM syncd.ledger l
      WHERE l.target_id = (SELECT id FROM syncd.ledger_targets
                           WHERE api = c.api AND criteo_segment_id = c.criteo_segment_id)
        AND l.identifier = syncd.ledger_pack(e.v));

-- name: mark_blocked
-- A plan the guard held back: recorded on the link (the plan itself was rolled back).
UPDATE syncd.segments
SET blocked_at = coalesce(blocked_at, now()), blocked_removes = $2, blocked_members = $3
WHERE segment_key = $1;

-- name: clear_block
-- A plan of the segment committed: whatever blocked it before is over, and an approval is
-- used up.
UPDATE syncd.segments
SET blocked_at = NULL, blocked_removes = NULL, blocked_members = NULL, removals_approved = false
WHERE segment_key = $1 AND (blocked_at IS NOT NULL OR removals_approved);

-- name: approve_removals
-- `syncd approve`: the next plan of a blocked segment goes through as it is then.
UPDATE syncd.segments SET removals_approved = true
WHERE segment_key = $1 AND blocked_at IS NOT NULL
RETURNING blocked_removes, blocked_members;
