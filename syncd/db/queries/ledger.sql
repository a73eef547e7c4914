-- The ledger: per Criteo segment, the identifiers Criteo has acknowledged (sql/0012_ledger.sql).
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...

-- name: lock_ledger_fold
-- One fold at a time, for this transaction: two folds at once could apply one
-- identifier's add and its later remove in the wrong order. $1, $2: locks.LEDGER_FOLD.
SELECT pg_advisory_xact_lock($1, $2);

-- name: fold_ledger
-- Fold up to $1 acknowledged chunks of the log (those still holding their payload) into
-- syncd.ledger, oldest plan first, and drop their payloads. Within the batch an identifier's
-- last operation wins (plans are netted: an identifier appears once per plan and target).
-- A batch never crosses a clear: it takes only chunks ordered before the first clear of the
-- log, whose id it returns (clear_id); once nothing before it is left, fold_clear applies
-- it, and the next batch goes on after it. Without a clear (one probe of the nearly always
-- empty chunks_unfolded_clears) the bound is the largest bigint: the scan of
-- chunks_unfolded is the same as without one.
-- Returns the chunks folded, the identifiers added and removed, and clear_id (or NULL).
WITH clear AS (
    SELECT c.plan_id, c.id FROM syncd.chunks c
    WHERE c.state = 'done' AND c.payload IS NOT NULL AND c.operation = 'clear'
    ORDER BY c.plan_id, c.id
    LIMIT 1
), log AS (
    SELECT c.id, c.plan_id, c.operation, c.payload,
        syncd.ledger_target(c.api, c.criteo_segment_id) AS target_id
    FROM syncd.chunks c
    WHERE c.state = 'done' AND c.payload IS NOT NULL
      AND (c.plan_id, c.id) < (
          coalesce((SELECT plan_id FROM clear), 9223372036854775807),
          coalesce((SELECT id FROM clear), 9223372036854775807))
    ORDER BY c.plan_id, c.id
    LIMIT $1
    FOR UPDATE OF c
), last AS (
    SELECT DISTINCT ON (log.target_id, e.identifier)
        log.target_id, syncd.ledger_pack(e.identifier) AS identifier, log.operation
    FROM log, json_array_elements_text(convert_from(log.payload, 'UTF8')::json) AS e(identifier)
    ORDER BY log.target_id, e.identifier, log.plan_id DESC, log.id DESC
), added AS (
    INSERT INTO syncd.ledger (target_id, identifier)
    SELECT target_id, identifier FROM last WHERE operation = 'add'
    ORDER BY target_id, identifier  -- in index order: each leaf page is written once
    ON CONFLICT DO NOTHING
    RETURNING 1
), removed AS (
    DELETE FROM syncd.ledger g
    USING last
    WHERE last.operation = 'remove'
      AND g.target_id = last.target_id AND g.identifier = last.identifier
    RETURNING 1
), folded AS (
    UPDATE syncd.chunks c SET payload = NULL FROM log WHERE c.id = log.id
    RETURNING 1
)
SELECT (SELECT count(*) FROM folded) AS chunks,
    (SELECT count(*) FROM added) AS added,
    (SELECT count(*) FROM removed) AS removed,
    (SELECT id FROM clear) AS clear_id;

-- name: fold_clear
-- Apply an acknowledged clear ($1, fold_ledger's clear_id, everything ordered before it
-- folded already): its target's ledger is emptied, as Criteo emptied the list, and it
-- leaves the log (its payload dropped). Returns the chunks applied (0 or 1) and the
-- identifiers removed.
WITH clear AS (
    UPDATE syncd.chunks c SET payload = NULL
    WHERE c.id = $1 AND c.operation = 'clear' AND c.state = 'done' AND c.payload IS NOT NULL
    RETURNING c.api, c.criteo_segment_id
), removed AS (
    DELETE FROM syncd.ledger g
    USING clear, syncd.ledger_targets t
    WHERE t.api = clear.api AND t.criteo_segment_id = clear.criteo_segment_id
      AND g.target_id = t.id
    RETURNING 1
)
SELECT (SELECT count(*) FROM clear) AS chunks, (SELECT count(*) FROM removed) AS removed;
