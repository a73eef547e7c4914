-- Segment lifecycle over Criteo's API: statistics readings.
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...

-- name: get_segment
-- One segment link, or no row.
SELECT * FROM syncd.segments WHERE segment_key = $1;

-- name: insert_segment_stats
-- Record one statistics reading ($5-$7 NULL when Criteo does not support them; $8, $9
-- the ledger's count and the window, for a verification).
INSERT INTO syncd.segment_stats
    (segment_key, api, criteo_segment_id, supported, number_of_identifiers,
     number_of_matches, match_rate, acknowledged, verified_window)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING read_at;

-- name: claim_verification
-- The verification of window $1, unless another replica has it: no row then.
INSERT INTO syncd.verifications (window_at, host) VALUES ($1, $2)
ON CONFLICT DO NOTHING
RETURNING window_at;

-- name: ledger_count
-- How many identifiers syncd has acknowledged for one Criteo segment (after a fold).
SELECT count(*)
FROM syncd.ledger l JOIN syncd.ledger_targets t ON t.id = l.target_id
WHERE t.api = $1 AND t.criteo_segment_id = $2;
