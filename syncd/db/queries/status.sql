-- What `syncd status` shows.
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...

-- name: open_chunks_summary
-- Chunks not yet acknowledged, by state, whoever planned them.
SELECT state, count(*) AS chunks, coalesce(sum(identifier_count), 0) AS identifiers,
    count(*) FILTER (WHERE state = 'pending' AND available_at > now()) AS deferred
FROM syncd.chunks WHERE state <> 'done'
GROUP BY state ORDER BY state;

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
-- Inbox rows whose segment key is not linked: kept, not sent, until it is linked. A key
-- with whitespace at an end can never be linked (`link` refuses it): flagged.
SELECT m.segment_key, count(*) AS changes, min(m.changed_at) AS oldest,
    m.segment_key <> syncd.trim_whitespace(m.segment_key) AS unlinkable
FROM syncd.membership_changes m
WHERE NOT EXISTS (SELECT 1 FROM syncd.segments s WHERE s.segment_key = m.segment_key)
GROUP BY m.segment_key ORDER BY m.segment_key;

-- name: waiting_linked
-- Inbox rows of linked segments that the next plan will consume.
SELECT count(*) FROM syncd.membership_changes m
WHERE EXISTS (SELECT 1 FROM syncd.segments s WHERE s.segment_key = m.segment_key);
