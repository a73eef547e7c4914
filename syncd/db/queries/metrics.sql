-- What the /metrics endpoint reads at scrape time, so every replica reports the same figures.
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...

-- name: chunk_gauges
-- Chunks not yet acknowledged (pending or claimed) and chunks left failing, all runs; and
-- segments whose plan the mass-removal guard blocked (they wait for a person).
SELECT count(*) FILTER (WHERE state IN ('pending', 'claimed')) AS pending,
    count(*) FILTER (WHERE state = 'failed') AS failed,
    (SELECT count(*) FROM syncd.segments WHERE blocked_at IS NOT NULL) AS blocked
FROM syncd.chunks WHERE state <> 'done';
