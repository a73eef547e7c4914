-- Runs of `syncd run` (the daemon) record their slot: one run per slot across replicas.
--
-- Every replica's scheduler fires ahead of each window (and, optionally, on interval
-- boundaries) and tries to insert the slot's run row; the unique index lets one insert win
-- (INSERT ... ON CONFLICT DO NOTHING), so replicas need no leader and never run one slot
-- twice. A run whose process went away before it finished (crashed: its lock is gone;
-- interrupted: a clean shutdown) leaves the index, so another replica may finish the
-- slot's work before its window; a run that succeeded or failed keeps the slot.
-- target_window, set by the daemon from SYNCD_WINDOWS_UTC, is the run's deadline.
-- `syncd sync` runs have no slot.
ALTER TABLE syncd.sync_runs ADD COLUMN slot text;
COMMENT ON COLUMN syncd.sync_runs.slot IS
    'window:<window> or interval:<boundary> (UTC, ISO 8601) for runs of `syncd run`; NULL for `syncd sync`';
CREATE UNIQUE INDEX sync_runs_slot_idx ON syncd.sync_runs (slot)
    WHERE status IN ('running', 'succeeded', 'failed');
-- `syncd status` and `syncd check` read the latest runs and the windows missed.
CREATE INDEX sync_runs_target_window_idx ON syncd.sync_runs (target_window);
