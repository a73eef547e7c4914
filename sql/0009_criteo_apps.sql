-- Several Criteo apps, each with its own credentials and call budget (issue 11).
--
-- A link names the app whose credentials push its chunks ('default': the app of
-- CRITEO_CLIENT_ID / CRITEO_CLIENT_SECRET, the only one until now). Each chunk records
-- the app with the rest of the target it was planned for, so re-pointing a link to
-- another app never moves chunks already planned.
ALTER TABLE syncd.segments
    ADD COLUMN app text NOT NULL DEFAULT 'default' CHECK (app ~ '^[a-z0-9_]+$');
ALTER TABLE syncd.chunks ADD COLUMN app text NOT NULL DEFAULT 'default';
ALTER TABLE syncd.push_audit ADD COLUMN app text;

-- One call budget per app, shared by every process that pushes for it: each call is
-- reserved by one atomic UPDATE (no lock held across an HTTP call). `next_at` is the
-- theoretical time of the next call (GCRA): it advances one interval per call, and a
-- call may go up to the burst tolerance ahead of it. `minute_*` count the calls of the
-- current minute, for `syncd status` and the run summary.
CREATE TABLE syncd.app_budgets (
    app            text PRIMARY KEY CHECK (app ~ '^[a-z0-9_]+$'),
    next_at        timestamptz NOT NULL DEFAULT now(),
    limit_per_min  integer,     -- what Criteo's x-ratelimit-limit last said (capped)
    minute_start   timestamptz NOT NULL DEFAULT now(),
    minute_calls   integer     NOT NULL DEFAULT 0,
    calls          bigint      NOT NULL DEFAULT 0,
    rate_limited   bigint      NOT NULL DEFAULT 0,  -- 429 answers
    updated_at     timestamptz NOT NULL DEFAULT now()
);
