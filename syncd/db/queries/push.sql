-- Push: claim a chunk, stream its payload, finish it with its audit row (fenced by the lease).
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...

-- name: claim_chunk
-- Claim the next chunk this run may send, in one short statement:
--   pending and due, or claimed by a run whose lease ran out or that is gone (no lock,
--   and its last heartbeat older than its takeover bound: none of its requests in flight);
--   and no chunk of an earlier plan of the same segment still open (order per segment);
--   with a target (a chunk without one can never be sent: passed over, listed by status);
--   and of an app in $3: configured, not cooling down after a 429, not holding its share
--   of the slots (a chunk of an app no longer configured waits, listed by status).
-- Returns the chunk, the target it was planned for, and the size of its payload
-- (streamed by payload_slice). No link is read: a link changed or removed since the
-- plan neither redirects nor strands a chunk.
WITH next AS (
    SELECT c.id
    FROM syncd.chunks c
    WHERE c.state IN ('pending', 'claimed') AND c.api IS NOT NULL
      AND (
          (c.state = 'pending' AND c.available_at <= now())
          -- (this run is alive: its own claims need no look at pg_locks)
          OR (c.state = 'claimed' AND c.owner_run_id <> $1
              AND (c.lease_until < now() OR syncd.run_is_gone(c.owner_run_id)))
      )
      AND NOT EXISTS (
          SELECT 1 FROM syncd.chunks e
          WHERE e.segment_key = c.segment_key AND e.plan_id < c.plan_id AND e.state <> 'done'
      )
      AND c.app = ANY ($3::text[])
    ORDER BY c.plan_id, c.id
    LIMIT 1
    FOR UPDATE OF c SKIP LOCKED
)
UPDATE syncd.chunks c
SET state = 'claimed', owner_run_id = $1, lease_until = now() + make_interval(secs => $2)
FROM next
WHERE c.id = next.id
RETURNING c.id, c.plan_id, c.segment_key, c.operation, c.identifier_type, c.identifier_count,
    octet_length(c.payload) AS payload_bytes,
    c.api, c.criteo_segment_id, c.account_id, c.gum_caller_id, c.app;

-- name: payload_slice
-- $3 bytes of a chunk's payload from byte $2 (1-based), while this run owns the chunk:
-- the payload is uncompressed and out of line, so only the TOAST chunks covered are read.
SELECT substring(payload FROM $2 FOR $3)
FROM syncd.chunks WHERE id = $1 AND owner_run_id = $4 AND state = 'claimed';

-- name: extend_lease
-- Before each HTTP attempt: renew the lease and count the attempt, or learn that the
-- lease was lost (no row). Also no row once the run's last heartbeat is older than it
-- vouches for: a run that may have lost its liveness lock sends nothing more.
UPDATE syncd.chunks
SET lease_until = now() + make_interval(secs => $3), attempts = attempts + 1
WHERE id = $1 AND owner_run_id = $2 AND state = 'claimed'
  AND EXISTS (
      SELECT 1 FROM syncd.sync_runs r
      WHERE r.id = $2
        AND (r.heartbeat_valid_s IS NULL
             OR r.heartbeat_at > now() - make_interval(secs => r.heartbeat_valid_s))
  )
RETURNING id;

-- name: finish_chunk
-- Record a chunk's outcome and its audit row in one statement, fenced by the lease:
-- no row comes back when another run owns the chunk now, and nothing is written.
-- The audit row names the chunk's own target: where the request went.
-- $3 new state: 'done' (acknowledged: the chunk and its payload are now the ledger's log,
-- see sql/0012_ledger.sql); 'pending' waits $4 seconds; 'failed' keeps it for the next run.
WITH chunk AS (
    UPDATE syncd.chunks c
    SET state = $3,
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
     contact_list_id, request_date, started_at, gum_caller_id, app)
SELECT $2, chunk.id, chunk.plan_id, chunk.segment_key, chunk.api, chunk.criteo_segment_id,
    chunk.operation, chunk.identifier_type, chunk.identifier_count,
    $5, $6, $7::jsonb, $8, $9, $11, $12, $10, $13::jsonb, $14::jsonb, $15, $16, $17,
    chunk.gum_caller_id, chunk.app
FROM chunk
RETURNING id;

-- name: split_chunk
-- Criteo refused a chunk as too large: replace it by its two halves in the same plan
-- (and for the same target).
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
                              identifier_count, api, criteo_segment_id, account_id,
                              gum_caller_id, send_as, app)
    SELECT src.plan_id, src.segment_key, src.operation, src.identifier_type,
        convert_to(json_agg(e.value ORDER BY e.n)::text, 'UTF8'), count(*),
        src.api, src.criteo_segment_id, src.account_id, src.gum_caller_id, src.send_as, src.app
    FROM src,
        json_array_elements(convert_from(src.payload, 'UTF8')::json) WITH ORDINALITY AS e(value, n)
    GROUP BY src.plan_id, src.segment_key, src.operation, src.identifier_type,
        src.api, src.criteo_segment_id, src.account_id, src.gum_caller_id, src.send_as,
        src.app, e.n <= src.identifier_count / 2
    RETURNING id
)
INSERT INTO syncd.push_audit
    (run_id, chunk_id, plan_id, segment_key, api, criteo_segment_id, operation, identifier_type,
     identifiers_sent, http_status, attempts, outcome, error_code, error_detail, started_at,
     gum_caller_id)
SELECT $2, src.id, src.plan_id, src.segment_key, src.api, src.criteo_segment_id, src.operation,
    src.identifier_type, src.identifier_count, $3, $4, 'split', $5, $6, $7, src.gum_caller_id
FROM src
WHERE (SELECT count(*) FROM halves) = 2 AND (SELECT count(*) FROM old) = 1
RETURNING id;

-- name: audit_lease_lost
-- The fenced finish found the chunk owned by another run: say so, change nothing else.
INSERT INTO syncd.push_audit
    (run_id, chunk_id, plan_id, segment_key, api, criteo_segment_id, operation, identifier_type,
     identifiers_sent, http_status, attempts, outcome, error_detail, started_at,
     gum_caller_id)
SELECT $2, c.id, c.plan_id, c.segment_key, c.api, c.criteo_segment_id, c.operation,
    c.identifier_type, c.identifier_count, $3, $4, 'lease_lost',
    'another run owns this chunk now; its outcome is recorded there', $5, c.gum_caller_id
FROM syncd.chunks c
WHERE c.id = $1;

-- name: release_run_claims
-- On a clean stop: hand back every chunk this run claimed but did not finish.
UPDATE syncd.chunks
SET state = 'pending', owner_run_id = NULL, lease_until = NULL
WHERE owner_run_id = $1 AND state = 'claimed'
RETURNING id;
