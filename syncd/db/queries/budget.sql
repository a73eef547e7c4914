-- The call budget of each Criteo app, shared by every process through this database.
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...
-- Each statement is its own short transaction: now() is the time it runs.

-- name: reserve_call
-- One call from an app's budget, in one atomic statement (no lock held across a request):
-- GCRA. `next_at` is the theoretical time of the next call; it advances one interval per
-- call, and a call may go up to the burst tolerance ahead of it. Returns the seconds to
-- wait before the call. $1 app, $2 interval s (0: unpaced, no wait, nothing owed), $3
-- tolerance s, $4 the limit per minute paced to (NULL: none), kept for status when the
-- app has none yet.
INSERT INTO syncd.app_budgets AS b
    (app, next_at, limit_per_min, minute_start, minute_calls, calls, updated_at)
VALUES ($1, now() + make_interval(secs => $2), $4, now(), 1, 1, now())
ON CONFLICT (app) DO UPDATE
SET next_at = CASE WHEN $2 > 0 THEN greatest(b.next_at, now()) + make_interval(secs => $2)
                   ELSE greatest(b.next_at, now()) END,
    -- note_limit changes it once an answer tells: a reservation made before then must not
    -- put the assumed limit back.
    limit_per_min = coalesce(b.limit_per_min, $4),
    minute_start = CASE WHEN b.minute_start <= now() - interval '1 minute'
                        THEN now() ELSE b.minute_start END,
    minute_calls = CASE WHEN b.minute_start <= now() - interval '1 minute'
                        THEN 1 ELSE b.minute_calls + 1 END,
    calls = b.calls + 1,
    updated_at = now()
RETURNING CASE WHEN $2 > 0
    THEN greatest(0.0, extract(epoch FROM b.next_at - now())::float8 - $2 - $3) ELSE 0.0 END
    AS wait_s;

-- name: hold_budget
-- Criteo said nothing is left until $2 (epoch seconds): no process of the app calls
-- before then ($3: the burst tolerance, so that calls resume one interval apart).
UPDATE syncd.app_budgets
SET next_at = greatest(next_at, to_timestamp($2) + make_interval(secs => $3)), updated_at = now()
WHERE app = $1;

-- name: count_rate_limited
-- Criteo answered 429 to one of the app's calls.
UPDATE syncd.app_budgets SET rate_limited = rate_limited + 1 WHERE app = $1;

-- name: budget_use
-- Each app's use of its budget: calls reserved in the current minute against the limit.
SELECT app, limit_per_min,
    CASE WHEN minute_start > now() - interval '1 minute' THEN minute_calls ELSE 0 END
        AS calls_this_minute,
    calls, rate_limited, updated_at
FROM syncd.app_budgets
ORDER BY app;

-- name: run_budget_use
-- The same, with the requests run $1 sent for each app (its audit rows' attempts).
SELECT b.app, b.limit_per_min,
    CASE WHEN b.minute_start > now() - interval '1 minute' THEN b.minute_calls ELSE 0 END
        AS calls_this_minute,
    b.calls, b.rate_limited, coalesce(r.requests, 0) AS run_requests
FROM syncd.app_budgets b
LEFT JOIN (
    SELECT app, sum(attempts) AS requests FROM syncd.push_audit WHERE run_id = $1 GROUP BY app
) r USING (app)
ORDER BY b.app;

-- name: note_limit
-- The limit per minute an app's calls are now paced to (Criteo said so), for status.
UPDATE syncd.app_budgets SET limit_per_min = $2 WHERE app = $1;
