-- Clear chunks: an outbox operation that empties a segment's list on Criteo (issue 13,
-- the layer under `syncd resync`).
--
-- A clear goes through the outbox like an add or a remove: claimed with a lease, sent with
-- retries, finished with its audit row, ordered by plan against the segment's other
-- chunks (a clear is a plan of its own, so the adds planned after it wait for it, and it
-- waits for every chunk planned before it). It carries no identifiers: identifier_count 0
-- and the payload '[]' (non-NULL, so that once acknowledged it is in the ledger's log and
-- the fold empties the target's ledger at its place in plan order; see fold_ledger).
ALTER TABLE syncd.chunks DROP CONSTRAINT chunks_operation_check;
ALTER TABLE syncd.chunks ADD CONSTRAINT chunks_operation_check
    CHECK (operation IN ('add', 'remove', 'clear'));
ALTER TABLE syncd.chunks ADD CONSTRAINT chunks_clear_is_empty
    CHECK (operation <> 'clear' OR identifier_count = 0);

-- A clear queued from the command line (`syncd resync`) belongs to no run: the run that
-- pushes it names itself in the clear's audit row. NULL: queued outside a run. (A run row
-- made for the purpose would count as a run in `syncd status`, `syncd check` and the
-- windows missed.)
ALTER TABLE syncd.plans ALTER COLUMN run_id DROP NOT NULL;

-- The fold finds the first acknowledged clear it has not applied yet with one probe of this
-- index (almost always empty), so a fold without a clear costs what it cost before.
CREATE INDEX chunks_unfolded_clears ON syncd.chunks (plan_id, id)
    WHERE state = 'done' AND payload IS NOT NULL AND operation = 'clear';
