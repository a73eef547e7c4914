-- Segment lifecycle over Criteo's API: statistics readings.
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...

-- name: get_segment
-- One segment link, or no row.
SELECT * FROM syncd.segments WHERE segment_key = $1;

-- name: insert_segment_stats
-- Record one statistics reading ($5-$7 NULL when Criteo does not support them).
INSERT INTO syncd.segment_stats
    (segment_key, api, criteo_segment_id, supported, number_of_identifiers,
     number_of_matches, match_rate)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING read_at;
