-- Every query syncd runs at runtime, one named block each: `-- name: x`, then what it does.
-- Parameters are asyncpg's $1, $2, ...; nothing here is assembled in Python.

-- name: create_migrations_table
-- The ledger of applied migrations (created before the first migration runs).
CREATE SCHEMA IF NOT EXISTS syncd;
CREATE TABLE IF NOT EXISTS syncd.schema_migrations (
    version    text PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
-- The migrations already applied, with their checksums.
SELECT version, name, checksum FROM syncd.schema_migrations ORDER BY version;

-- name: record_migration
-- Record one applied migration.
INSERT INTO syncd.schema_migrations (version, name, checksum) VALUES ($1, $2, $3);

-- name: get_segment
-- One segment link.
SELECT * FROM syncd.segments WHERE segment_key = $1;

-- name: get_segment_for_update
-- One segment link, locked until the end of the transaction.
SELECT * FROM syncd.segments WHERE segment_key = $1 FOR UPDATE;

-- name: insert_segment
-- Link a new segment key.
INSERT INTO syncd.segments
    (segment_key, api, criteo_segment_id, identifier_type, send_as, account_id, gum_caller_id)
VALUES ($1, $2, $3, $4, $5, $6, $7);

-- name: update_segment
-- Re-point an existing link (same identifier type and send mode: planned chunks stay valid).
UPDATE syncd.segments
SET api = $2, criteo_segment_id = $3, account_id = $6, gum_caller_id = $7, updated_at = now()
WHERE segment_key = $1 AND identifier_type = $4 AND send_as = $5;

-- name: list_segments
-- Every link, with its waiting changes and open chunks.
SELECT s.*,
    (SELECT count(*) FROM syncd.membership_changes m WHERE m.segment_key = s.segment_key)
        AS waiting_changes,
    (SELECT count(*) FROM syncd.chunks c WHERE c.segment_key = s.segment_key AND c.state <> 'done')
        AS open_chunks
FROM syncd.segments s
ORDER BY s.segment_key;

-- name: count_open_chunks
-- Chunks of a segment not yet acknowledged.
SELECT count(*) FROM syncd.chunks WHERE segment_key = $1 AND state <> 'done';

-- name: discard_open_chunks
-- Drop a segment's unacknowledged chunks (unlink --force).
DELETE FROM syncd.chunks WHERE segment_key = $1 AND state <> 'done';

-- name: delete_segment
-- Remove a link.
DELETE FROM syncd.segments WHERE segment_key = $1;

-- name: start_run
-- A new run row; its target is the next Criteo processing window (00:00 or 12:00 UTC).
INSERT INTO syncd.sync_runs (trigger, host, pid, target_window)
VALUES ($1, $2, $3,
    date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    + CASE WHEN extract(hour FROM now() AT TIME ZONE 'UTC') < 12
        THEN interval '12 hours' ELSE interval '24 hours' END)
RETURNING id, target_window;

-- name: hold_run_lock
-- Held on the run's dedicated connection until it ends: syncd.run_is_alive() reads it.
SELECT pg_advisory_lock(1937337955, ($1 % 2147483647)::int);

-- name: mark_dead_runs
-- Runs still 'running' whose process is gone (kill -9, crash) are marked crashed.
UPDATE syncd.sync_runs SET status = 'crashed', finished_at = now()
WHERE status = 'running' AND NOT syncd.run_is_alive(id)
RETURNING id;

-- name: rearm_failed_chunks
-- A new run gives failed chunks a fresh set of attempts: the next run finishes the job.
UPDATE syncd.chunks
SET state = 'pending', attempts = 0, available_at = now(), owner_run_id = NULL, lease_until = NULL
WHERE state = 'failed';

-- name: prune_history
-- Forget acknowledged plans, and rejected identifiers, older than the retention period.
WITH old_plans AS (
    DELETE FROM syncd.plans p
    WHERE p.created_at < now() - make_interval(days => $1)
      AND NOT EXISTS (SELECT 1 FROM syncd.chunks c WHERE c.plan_id = p.id AND c.state <> 'done')
    RETURNING 1
), old_rejected AS (
    DELETE FROM syncd.rejected_identifiers
    WHERE rejected_at < now() - make_interval(days => $1)
    RETURNING 1
)
SELECT (SELECT count(*) FROM old_plans) AS plans, (SELECT count(*) FROM old_rejected) AS rejected;

-- name: segments_to_plan
-- Linked segments that have changes visible in the inbox. One index probe per segment
-- (LIMIT 1), where EXISTS would read the whole inbox to build a hash of its keys.
SELECT s.segment_key, s.identifier_type, s.send_as
FROM syncd.segments s
WHERE (SELECT true FROM syncd.membership_changes m WHERE m.segment_key = s.segment_key LIMIT 1)
ORDER BY s.segment_key;

-- name: lock_segment_plan
-- Plans of one segment are serialised, so plan ids order a segment's changes. A session
-- lock, taken before the plan's transaction begins, so that the transaction's snapshot
-- already sees what the previous plan of the segment consumed.
SELECT pg_advisory_lock(hashtext('syncd.plan'), hashtext($1));

-- name: unlock_segment_plan
-- After the plan's transaction ended (the pool also drops every advisory lock on release).
SELECT pg_advisory_unlock(hashtext('syncd.plan'), hashtext($1));

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
--   id winning; cut the net operations into chunks of at most $6 identifiers.
-- Netting packs (id, operation) into one bigint, id * 2 + (1 for add), so one aggregate
-- finds the latest operation per value.
-- $1 plan id, $2 segment key, $3 identifier type, $4 send_as, $5 run id, $6 chunk size.
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
), numbered AS (
    -- A running count per operation, in scan order: no sort needed to number the rows.
    SELECT value, is_add,
        (CASE WHEN is_add THEN count(*) FILTER (WHERE is_add) OVER running
              ELSE count(*) FILTER (WHERE NOT is_add) OVER running END - 1) / $6 AS chunk_no
    FROM net
    WINDOW running AS (ROWS UNBOUNDED PRECEDING)
), chunks AS (
    -- The payload is stored as the bytes sent: a UTF-8 JSON array (see push.py).
    -- json_agg writes it directly, at 0.3 CPU-s per million identifiers where
    -- array_to_json(array_agg()) takes 0.8 (it builds the array first).
    INSERT INTO syncd.chunks (plan_id, segment_key, operation, identifier_type, payload,
                              identifier_count)
    SELECT $1, $2, CASE WHEN is_add THEN 'add' ELSE 'remove' END, $3,
        convert_to(json_agg(value)::text, 'UTF8'), count(*)
    FROM numbered
    GROUP BY is_add, chunk_no
    RETURNING operation, identifier_count
)
SELECT
    (SELECT count(*) FROM normalised) AS changes_consumed,
    (SELECT count(*) FROM rejected) AS rejected,
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
SET changes_consumed = $2, rejected = $3, adds = $4, removes = $5, chunks = $6
WHERE id = $1;

-- name: claim_chunk
-- Claim the next chunk this run may send, in one short statement:
--   pending and due, or claimed by a run whose lease ran out or whose process is gone;
--   and no chunk of an earlier plan of the same segment still open (order per segment).
-- Returns the chunk, its link, and the size of its payload (streamed by payload_slice).
WITH next AS (
    SELECT c.id
    FROM syncd.chunks c
    WHERE c.state IN ('pending', 'claimed')
      AND (
          (c.state = 'pending' AND c.available_at <= now())
          -- (this run is alive: its own claims need no look at pg_locks)
          OR (c.state = 'claimed' AND c.owner_run_id <> $1
              AND (c.lease_until < now() OR NOT syncd.run_is_alive(c.owner_run_id)))
      )
      AND NOT EXISTS (
          SELECT 1 FROM syncd.chunks e
          WHERE e.segment_key = c.segment_key AND e.plan_id < c.plan_id AND e.state <> 'done'
      )
    ORDER BY c.plan_id, c.id
    LIMIT 1
    FOR UPDATE OF c SKIP LOCKED
)
UPDATE syncd.chunks c
SET state = 'claimed', owner_run_id = $1, lease_until = now() + make_interval(secs => $2)
FROM next, syncd.segments s
WHERE c.id = next.id AND s.segment_key = c.segment_key
RETURNING c.id, c.plan_id, c.segment_key, c.operation, c.identifier_type, c.identifier_count,
    octet_length(c.payload) AS payload_bytes,
    s.api, s.criteo_segment_id, s.account_id, s.gum_caller_id;

-- name: payload_slice
-- $3 bytes of a chunk's payload from byte $2 (1-based), while this run owns the chunk:
-- the payload is uncompressed and out of line, so only the TOAST chunks covered are read.
SELECT substring(payload FROM $2 FOR $3)
FROM syncd.chunks WHERE id = $1 AND owner_run_id = $4 AND state = 'claimed';

-- name: extend_lease
-- Before each HTTP attempt: renew the lease and count the attempt, or learn that the
-- lease was lost (no row).
UPDATE syncd.chunks
SET lease_until = now() + make_interval(secs => $3), attempts = attempts + 1
WHERE id = $1 AND owner_run_id = $2 AND state = 'claimed'
RETURNING id;

-- name: finish_chunk
-- Record a chunk's outcome and its audit row in one statement, fenced by the lease:
-- no row comes back when another run owns the chunk now, and nothing is written.
-- $3 new state: 'done' drops the payload; 'pending' waits $4 seconds; 'failed' keeps it.
WITH chunk AS (
    UPDATE syncd.chunks c
    SET state = $3,
        payload = CASE WHEN $3 = 'done' THEN NULL ELSE c.payload END,
        done_at = CASE WHEN $3 = 'done' THEN now() END,
        available_at = now() + make_interval(secs => $4),
        owner_run_id = NULL, lease_until = NULL,
        last_error = $10
    WHERE c.id = $1 AND c.owner_run_id = $2 AND c.state = 'claimed'
    RETURNING c.*
)
INSERT INTO syncd.push_audit
    (run_id, chunk_id, plan_id, segment_key, api, criteo_segment_id, operation, identifier_type,
     identifiers_sent, nb_valid_identifiers, nb_invalid_identifiers, sample_invalid_identifiers,
     http_status, attempts, outcome, error_code, error_detail, warnings, errors,
     contact_list_id, request_date, started_at)
SELECT $2, chunk.id, chunk.plan_id, chunk.segment_key, s.api, s.criteo_segment_id,
    chunk.operation, chunk.identifier_type, chunk.identifier_count,
    $5, $6, $7::jsonb, $8, $9, $11, $12, $10, $13::jsonb, $14::jsonb, $15, $16, $17
FROM chunk JOIN syncd.segments s USING (segment_key)
RETURNING id;

-- name: split_chunk
-- Criteo refused a chunk as too large: replace it by its two halves in the same plan.
-- $1 chunk id, $2 run id, $3 http status, $4 attempts, $5 error code, $6 detail, $7 started.
WITH src AS (
    SELECT * FROM syncd.chunks
    WHERE id = $1 AND owner_run_id = $2 AND state = 'claimed' AND identifier_count > 1
    FOR UPDATE
), old AS (
    UPDATE syncd.chunks c
    SET state = 'done', payload = NULL, done_at = now(), owner_run_id = NULL,
        lease_until = NULL, last_error = 'split in two: refused as too large'
    FROM src WHERE c.id = src.id
    RETURNING c.id
), halves AS (
    INSERT INTO syncd.chunks (plan_id, segment_key, operation, identifier_type, payload,
                              identifier_count)
    SELECT src.plan_id, src.segment_key, src.operation, src.identifier_type,
        convert_to(json_agg(e.value ORDER BY e.n)::text, 'UTF8'), count(*)
    FROM src,
        json_array_elements(convert_from(src.payload, 'UTF8')::json) WITH ORDINALITY AS e(value, n)
    GROUP BY src.plan_id, src.segment_key, src.operation, src.identifier_type,
        e.n <= src.identifier_count / 2
    RETURNING id
)
INSERT INTO syncd.push_audit
    (run_id, chunk_id, plan_id, segment_key, api, criteo_segment_id, operation, identifier_type,
     identifiers_sent, http_status, attempts, outcome, error_code, error_detail, started_at)
SELECT $2, src.id, src.plan_id, src.segment_key, s.api, s.criteo_segment_id, src.operation,
    src.identifier_type, src.identifier_count, $3, $4, 'split', $5, $6, $7
FROM src JOIN syncd.segments s USING (segment_key)
WHERE (SELECT count(*) FROM halves) = 2 AND (SELECT count(*) FROM old) = 1
RETURNING id;

-- name: audit_lease_lost
-- The fenced finish found the chunk owned by another run: say so, change nothing else.
INSERT INTO syncd.push_audit
    (run_id, chunk_id, plan_id, segment_key, api, criteo_segment_id, operation, identifier_type,
     identifiers_sent, http_status, attempts, outcome, error_detail, started_at)
SELECT $2, c.id, c.plan_id, c.segment_key, s.api, s.criteo_segment_id, c.operation,
    c.identifier_type, c.identifier_count, $3, $4, 'lease_lost',
    'another run owns this chunk now; its outcome is recorded there', $5
FROM syncd.chunks c JOIN syncd.segments s USING (segment_key)
WHERE c.id = $1;

-- name: release_run_claims
-- On a clean stop: hand back every chunk this run claimed but did not finish.
UPDATE syncd.chunks
SET state = 'pending', owner_run_id = NULL, lease_until = NULL
WHERE owner_run_id = $1 AND state = 'claimed'
RETURNING id;

-- name: finish_run
-- Close a run with its totals.
UPDATE syncd.sync_runs
SET status = $2, finished_at = now(), made_window = now() <= target_window,
    changes_consumed = $3, identifiers_rejected = $4, chunks_planned = $5,
    chunks_acknowledged = $6, chunks_failed = $7, chunks_left = $8, requests = $9,
    identifiers_sent = $10, nb_valid_identifiers = $11, nb_invalid_identifiers = $12,
    error = $13
WHERE id = $1
RETURNING made_window;

-- name: claimed_elsewhere
-- Whether another live run still holds chunks (this run waits for them: they may unblock
-- later chunks of the same segments).
SELECT EXISTS (
    SELECT 1 FROM syncd.chunks
    WHERE state = 'claimed' AND owner_run_id <> $1
      AND lease_until >= now() AND syncd.run_is_alive(owner_run_id)
);

-- name: chunks_left
-- Chunks not acknowledged at the end of a run (failed, or pending for a later run).
SELECT count(*) FROM syncd.chunks WHERE state IN ('pending', 'failed');

-- name: open_chunks_summary
-- Chunks not yet acknowledged, by state, whoever planned them.
SELECT state, count(*) AS chunks, coalesce(sum(identifier_count), 0) AS identifiers,
    count(*) FILTER (WHERE state = 'pending' AND available_at > now()) AS deferred
FROM syncd.chunks WHERE state <> 'done'
GROUP BY state ORDER BY state;

-- name: run_segment_report
-- Per segment and operation: what a run sent and what Criteo said about it.
SELECT a.segment_key, a.operation,
    count(*) FILTER (WHERE a.outcome = 'acknowledged') AS chunks_acknowledged,
    count(*) FILTER (WHERE a.outcome = 'failed') AS chunks_failed,
    coalesce(sum(a.identifiers_sent) FILTER (WHERE a.outcome = 'acknowledged'), 0) AS sent,
    coalesce(sum(a.nb_valid_identifiers), 0) AS valid,
    coalesce(sum(a.nb_invalid_identifiers), 0) AS invalid,
    sum(a.attempts) AS requests,
    string_agg(DISTINCT a.error_code, ', ') AS error_codes
FROM syncd.push_audit a
WHERE a.run_id = $1
GROUP BY a.segment_key, a.operation
ORDER BY a.segment_key, a.operation;

-- name: run_rejected_report
-- Rejected identifiers of a run, per segment and reason.
SELECT segment_key, reason, count(*) AS identifiers
FROM syncd.rejected_identifiers WHERE run_id = $1
GROUP BY segment_key, reason ORDER BY segment_key, reason;

-- name: recent_runs
-- The latest runs, newest first.
SELECT id, trigger, status, started_at, finished_at, target_window, made_window,
    changes_consumed, identifiers_rejected, chunks_planned, chunks_acknowledged, chunks_failed,
    chunks_left, identifiers_sent, nb_valid_identifiers, nb_invalid_identifiers, error
FROM syncd.sync_runs ORDER BY id DESC LIMIT $1;

-- name: failed_chunks
-- Chunks left failing, with the reason of their last attempt.
SELECT c.id, c.segment_key, c.operation, c.identifier_count, c.last_error, c.plan_id
FROM syncd.chunks c WHERE c.state = 'failed' ORDER BY c.plan_id, c.id LIMIT $1;

-- name: waiting_unlinked
-- Inbox rows whose segment key is not linked: kept, not sent, until it is linked.
SELECT m.segment_key, count(*) AS changes, min(m.changed_at) AS oldest
FROM syncd.membership_changes m
WHERE NOT EXISTS (SELECT 1 FROM syncd.segments s WHERE s.segment_key = m.segment_key)
GROUP BY m.segment_key ORDER BY m.segment_key;

-- name: waiting_linked
-- Inbox rows of linked segments that the next plan will consume.
SELECT count(*) FROM syncd.membership_changes m
WHERE EXISTS (SELECT 1 FROM syncd.segments s WHERE s.segment_key = m.segment_key);
