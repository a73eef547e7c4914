-- Sync runs: their rows, liveness, housekeeping and totals.
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...

-- name: start_run
-- A new run row; its target is the next Criteo processing window (00:00 or 12:00 UTC).
-- Its first heartbeat is now; $4: how long a heartbeat vouches for its sends, $5: how long
-- after its last heartbeat none of its requests can still be in flight (see 0007).
INSERT INTO syncd.sync_runs
    (trigger, host, pid, target_window, heartbeat_at, heartbeat_valid_s, takeover_after_s)
VALUES ($1, $2, $3,
    date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    + CASE WHEN extract(hour FROM now() AT TIME ZONE 'UTC') < 12
        THEN interval '12 hours' ELSE interval '24 hours' END,
    now(), $4, $5)
RETURNING id, target_window;

-- name: start_slot_run
-- The run row of a daemon slot, unless a run of the slot is running or finished (see
-- 0008): no row then, and this replica leaves the slot to the run that has it. $6: the
-- window it targets (from SYNCD_WINDOWS_UTC), its deadline; $7: the slot key.
INSERT INTO syncd.sync_runs
    (trigger, host, pid, target_window, heartbeat_at, heartbeat_valid_s, takeover_after_s, slot)
VALUES ($1, $2, $3, $6, now(), $4, $5, $7)
ON CONFLICT (slot) WHERE status IN ('running', 'succeeded', 'failed') DO NOTHING
RETURNING id, target_window;

-- name: start_preview_run
-- The run row `syncd plan` plans under, in a transaction it rolls back: an id of its own
-- (minus the backend's pid, unique among sessions) so that no run id is used up.
INSERT INTO syncd.sync_runs (id, trigger, host, pid, target_window)
OVERRIDING SYSTEM VALUE
VALUES (-pg_backend_pid(), 'plan', $1, $2, now())
RETURNING id;

-- name: hold_run_lock
-- Held on the run's dedicated connection until it ends: syncd.run_is_alive() reads it.
-- The key is syncd.db.locks.RUN_LOCK_NAMESPACE and the run id.
SELECT pg_advisory_lock(1937337955, ($1 % 2147483647)::int);

-- name: keep_lock_connection_alive
-- The lock connection sits idle between heartbeats: no idle_session_timeout (PostgreSQL
-- 14+) for it, and TCP keepalives from the server so a dead peer or a silent proxy is
-- noticed (they do not apply to Unix sockets). Named for pg_stat_activity.
DO $$
BEGIN
    PERFORM set_config('application_name', 'syncd run lock', false);
    PERFORM set_config('tcp_keepalives_idle', '30', false);
    PERFORM set_config('tcp_keepalives_interval', '10', false);
    PERFORM set_config('tcp_keepalives_count', '3', false);
    IF current_setting('server_version_num')::int >= 140000 THEN
        PERFORM set_config('idle_session_timeout', '0', false);
    END IF;
END
$$;

-- name: run_heartbeat
-- From the lock connection: the run still holds its lock, said with the time; no row when
-- it does not (then the run stops).
UPDATE syncd.sync_runs SET heartbeat_at = now()
WHERE id = $1 AND syncd.run_is_alive($1)
RETURNING id;

-- name: mark_dead_runs
-- Runs still 'running' whose process is gone (kill -9, crash) are marked crashed.
UPDATE syncd.sync_runs SET status = 'crashed', finished_at = now()
WHERE status = 'running' AND NOT syncd.run_is_alive(id)
RETURNING id;

-- name: rearm_failed_chunks
-- A new run gives failed chunks a fresh set of attempts: the next run finishes the job.
UPDATE syncd.chunks
SET state = 'pending', attempts = 0, available_at = now(), owner_run_id = NULL, lease_until = NULL
WHERE state = 'failed'
RETURNING id;

-- name: prune_history
-- Forget acknowledged (and folded) plans, and rejected identifiers, older than the
-- retention period.
WITH old_plans AS (
    DELETE FROM syncd.plans p
    WHERE p.created_at < now() - make_interval(days => $1)
      AND NOT EXISTS (
          -- open, or acknowledged and not yet folded into the ledger
          SELECT 1 FROM syncd.chunks c
          WHERE c.plan_id = p.id AND (c.state <> 'done' OR c.payload IS NOT NULL)
      )
    RETURNING 1
), old_rejected AS (
    DELETE FROM syncd.rejected_identifiers
    WHERE rejected_at < now() - make_interval(days => $1)
    RETURNING 1
)
SELECT (SELECT count(*) FROM old_plans) AS plans, (SELECT count(*) FROM old_rejected) AS rejected;

-- name: finish_run
-- Close a run with its totals. Only a run that finished its work made the window.
UPDATE syncd.sync_runs
SET status = $2, finished_at = now(), made_window = $2 = 'succeeded' AND now() <= target_window,
    changes_consumed = $3, identifiers_rejected = $4, chunks_planned = $5,
    chunks_acknowledged = $6, chunks_failed = $7, chunks_left = $8, requests = $9,
    identifiers_sent = $10, nb_valid_identifiers = $11, nb_invalid_identifiers = $12,
    error = $13, identifiers_suppressed = $14
WHERE id = $1
RETURNING made_window;

-- name: claimed_elsewhere
-- Whether another run still holds chunks that this run may not take over yet (this run
-- waits for them: they may unblock later chunks of the same segments).
SELECT EXISTS (
    SELECT 1 FROM syncd.chunks
    WHERE state = 'claimed' AND owner_run_id <> $1
      AND lease_until >= now() AND NOT syncd.run_is_gone(owner_run_id)
);

-- name: chunks_left
-- Chunks not acknowledged at the end of a run (failed, or pending for a later run).
SELECT count(*) FROM syncd.chunks WHERE state IN ('pending', 'failed');

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

-- name: unacknowledged_by_segment
-- What a window was missed with: per segment, the chunks and identifiers not acknowledged.
SELECT segment_key, state, count(*) AS chunks, coalesce(sum(identifier_count), 0) AS identifiers
FROM syncd.chunks WHERE state <> 'done'
GROUP BY segment_key, state ORDER BY segment_key, state;

-- name: last_success
-- When the last run that left nothing failing ended (Unix time), or NULL: the daemon's
-- syncd_last_success_timestamp_seconds starts from it, not from 0, so a restart or a fresh
-- replica does not look like a deployment that never succeeded.
SELECT extract(epoch FROM max(finished_at))::float8
FROM syncd.sync_runs WHERE status = 'succeeded';

-- name: record_api_notice
-- The API version a run used, whether Criteo called it deprecated, and the sunset date.
UPDATE syncd.sync_runs SET api_version = $2, api_deprecated = $3, api_sunset = $4
WHERE id = $1;
