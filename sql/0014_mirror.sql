-- Desired-state (mirror) links, and the mass-removal guard (issue 13).
--
-- A mirror link's membership is a relation the CRM keeps (a table, a view, a dbt model)
-- with the columns segment_key and identifier: each sync diffs the rows of its key,
-- normalised and hashed like inbox changes, against the ledger (what Criteo acknowledged,
-- sql/0012_ledger.sql) and plans only the difference. The relation is stored resolved
-- (regclass's text: schema-qualified and quoted where needed), so a later search_path
-- does not change what a link reads; it is looked up by name at every plan, so a view a
-- deploy drops and re-creates keeps working, and one that is gone fails that plan.
ALTER TABLE syncd.segments
    ADD COLUMN mirror_relation text,
    -- The guard: a plan that would remove more than SYNCD_MAX_REMOVE_FRACTION of the
    -- segment's acknowledged members is rolled back and recorded here; `syncd approve`
    -- lets the next plan of the segment through as it is then. Cleared by every plan
    -- that commits (the approved one, or one that finds the source filled again).
    ADD COLUMN blocked_at timestamptz,
    ADD COLUMN blocked_removes bigint,
    ADD COLUMN blocked_members bigint,
    ADD COLUMN removals_approved boolean NOT NULL DEFAULT false;

-- The rows of one key in a mirror relation, as text. A function so that the relation can
-- be a parameter (an identifier cannot be one): format's %s of a regclass is its quoted
-- name. ROWS: a mirror is typically large; the default estimate (1,000) would lead the
-- planner to nested loops in the diff.
CREATE FUNCTION syncd.mirror_members(relation regclass, key text) RETURNS SETOF text
LANGUAGE plpgsql STABLE ROWS 1000000 AS $$
BEGIN
    RETURN QUERY EXECUTE
        format('SELECT identifier::text FROM %s WHERE segment_key = $1', relation)
        USING key;
END
$$;

-- A value a mirror source holds has no change id and no change time: rejections of mirror
-- rows carry neither, and are recorded once per key and value (a source keeps its bad
-- rows from one sync to the next; recording them every sync would grow without bound).
ALTER TABLE syncd.rejected_identifiers
    ALTER COLUMN change_id DROP NOT NULL,
    ALTER COLUMN changed_at DROP NOT NULL;
CREATE INDEX rejected_identifiers_mirror_idx
    ON syncd.rejected_identifiers (segment_key, identifier) WHERE change_id IS NULL;

-- What Criteo has, or will have once every chunk already planned has gone, of one target
-- (api, Criteo segment id), packed like the ledger: the ledger, overlaid with the target's
-- chunks not folded into it yet (open, or acknowledged since the last fold), the last
-- operation per value winning in plan order. A clear among those chunks (resync) empties
-- everything before it. Mirror diffs and resyncs start from this, so a plan never repeats
-- nor undoes one still on its way.
CREATE INDEX chunks_target_log ON syncd.chunks (api, criteo_segment_id)
    WHERE payload IS NOT NULL;

CREATE FUNCTION syncd.target_members(p_api text, p_segment_id text)
RETURNS TABLE (packed bytea)
LANGUAGE sql STABLE AS $$
    WITH log AS (
        SELECT c.plan_id, c.id, c.operation, c.payload
        FROM syncd.chunks c
        WHERE c.api = p_api AND c.criteo_segment_id = p_segment_id AND c.payload IS NOT NULL
    ), last_clear AS (
        SELECT plan_id, id FROM log WHERE operation = 'clear'
        ORDER BY plan_id DESC, id DESC LIMIT 1
    ), ops AS (
        SELECT DISTINCT ON (1) syncd.ledger_pack(e.v) AS packed, log.operation
        FROM log, json_array_elements_text(convert_from(log.payload, 'UTF8')::json) AS e(v)
        WHERE NOT EXISTS (
            SELECT 1 FROM last_clear k WHERE (log.plan_id, log.id) <= (k.plan_id, k.id))
        ORDER BY 1, log.plan_id DESC, log.id DESC
    )
    SELECT l.identifier FROM syncd.ledger l
    WHERE l.target_id = (SELECT id FROM syncd.ledger_targets
                         WHERE api = p_api AND criteo_segment_id = p_segment_id)
      AND NOT EXISTS (SELECT 1 FROM last_clear)
      AND NOT EXISTS (SELECT 1 FROM ops o WHERE o.packed = l.identifier)
    UNION ALL
    SELECT packed FROM ops WHERE operation = 'add'
$$;
