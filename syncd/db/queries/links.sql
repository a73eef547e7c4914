-- Segment links: which Criteo segment each CRM segment key feeds.
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...

-- name: get_segment_for_update
-- One segment link, locked until the end of the transaction. Every link change takes
-- this lock first: it waits for a plan of the key (which holds the link FOR SHARE until
-- it commits), then sees that plan's chunks.
SELECT * FROM syncd.segments WHERE segment_key = $1 FOR UPDATE;

-- name: insert_segment
-- Link a new segment key.
INSERT INTO syncd.segments
    (segment_key, api, criteo_segment_id, identifier_type, send_as, account_id, gum_caller_id,
     app, mirror_relation)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9);

-- name: update_segment
-- Re-point an existing link (same identifier type and send mode: planned chunks stay valid),
-- or turn it into a mirror link or back ($9).
UPDATE syncd.segments
SET api = $2, criteo_segment_id = $3, account_id = $6, gum_caller_id = $7, app = $8,
    mirror_relation = $9, updated_at = now()
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

-- name: open_chunk_targets
-- A segment's chunks not yet acknowledged, per target they were planned for (a NULL
-- api: no target known, planned before syncd recorded targets; they cannot be sent).
SELECT api, criteo_segment_id, account_id, gum_caller_id, app, count(*) AS chunks
FROM syncd.chunks WHERE segment_key = $1 AND state <> 'done'
GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5;

-- name: discard_open_chunks
-- Drop a segment's unacknowledged chunks (unlink --force).
DELETE FROM syncd.chunks WHERE segment_key = $1 AND state <> 'done';

-- name: delete_segment
-- Remove a link, and a mirror link's rows as last diffed (sql/0017_mirror_rows.sql): a key
-- linked again may send another identifier type, whose values differ.
WITH cached AS (DELETE FROM syncd.mirror_rows WHERE segment_key = $1),
    state AS (DELETE FROM syncd.mirror_state WHERE segment_key = $1)
DELETE FROM syncd.segments WHERE segment_key = $1;
