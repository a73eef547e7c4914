-- Run liveness on a heartbeat, and takeover only once a lost run can send nothing more.
--
-- A run's advisory lock (syncd.run_is_alive) vanishes when its process dies, but also when
-- its idle lock connection is closed under it (idle_session_timeout, pg_terminate_backend,
-- a proxy) while the run goes on, its requests still in flight. So the lock alone no longer
-- makes a run's claims free. Each run now
--   * writes heartbeat_at from its lock connection every few seconds, proving the lock held;
--   * sends nothing (the lease renewal before each send refuses) once its last heartbeat is
--     older than heartbeat_valid_s;
--   * records takeover_after_s: heartbeat_valid_s + the HTTP timeout + a margin, the time
--     after its last heartbeat by which none of its requests can still be in flight.
-- Another run takes over a lockless run's claims only after that (syncd.run_is_gone); a
-- run killed with kill -9 is therefore taken over takeover_after_s after its last
-- heartbeat at the latest (75 s with the default 60 s HTTP timeout).
-- Runs started by an older syncd have no heartbeat: they are gone as soon as their lock is.

ALTER TABLE syncd.sync_runs
    ADD COLUMN heartbeat_at timestamptz,
    ADD COLUMN heartbeat_valid_s double precision,
    ADD COLUMN takeover_after_s double precision;

-- Whether none of a run's requests can still be in flight: its lock is gone and its last
-- heartbeat is older than the bound it recorded.
CREATE FUNCTION syncd.run_is_gone(run_id bigint)
RETURNS boolean
LANGUAGE sql STABLE
AS $fn$
SELECT NOT syncd.run_is_alive(run_id) AND coalesce(
    (SELECT r.heartbeat_at + make_interval(secs => r.takeover_after_s)
     FROM syncd.sync_runs r WHERE r.id = run_id),
    '-infinity') < now()
$fn$;

-- status and the ledger of a run look its plans up by run.
CREATE INDEX plans_run_idx ON syncd.plans (run_id);
