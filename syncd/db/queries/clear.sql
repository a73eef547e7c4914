-- Clear chunks: queueing one (syncd/clear.py, sql/0015_clear_chunks.sql).
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...

-- name: holds_segment_plan_lock
-- Whether this session holds the plan lock of segment $1 (lock_segment_plan): the
-- two-key form shows in pg_locks as classid = key 1, objid = key 2, objsubid = 2.
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid = hashtext('syncd.plan')::oid
      AND objid = hashtext($1)::oid
      AND objsubid = 2
);

-- name: insert_clear_chunk
-- A plan's one clear chunk, for the link's target: no identifiers (identifier_count 0) and
-- the payload '[]', not NULL, so that once acknowledged it is in the ledger's log.
-- $1 plan id, $2 segment key, $3 identifier type, $4 api, $5 Criteo segment id,
-- $6 account id, $7 gum caller id, $8 send_as, $9 app.
INSERT INTO syncd.chunks (plan_id, segment_key, operation, identifier_type, payload,
                          identifier_count, api, criteo_segment_id, account_id,
                          gum_caller_id, send_as, app)
VALUES ($1, $2, 'clear', $3, convert_to('[]', 'UTF8'), 0, $4, $5, $6, $7, $8, $9);
