-- What `syncd status` shows.
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...

-- name: open_chunks_summary
-- Chunks not yet acknowledged, by state, whoever planned them.
SELECT state, count(*) AS chunks, coalesce(sum(identifier_count), 0) AS identifiers,
    count(*) FILTER (WHERE state = 'pending' AND available_at > now()) AS deferred
FROM syncd.chunks WHERE state <> 'done'
GROUP BY state ORDER BY state;

-- name: recent_runs
-- The latest runs, newest first. Totals come from the run's plans and audit rows, so a
-- run killed before it wrote its own totals still shows what it did (greatest(): the
-- row's figures once its plans are pruned). What was left is known only at a clean end.
SELECT r.id, r.trigger, r.status, r.started_at, r.finished_at, r.target_window, r.made_window,
    greatest(r.changes_consumed, p.changes) AS changes_consumed,
    greatest(r.identifiers_rejected, p.rejected) AS identifiers_rejected,
    greatest(r.identifiers_suppressed, p.suppressed) AS identifiers_suppressed,
    greatest(r.chunks_planned, p.chunks) AS chunks_planned,
    greatest(r.chunks_acknowledged, a.acknowledged) AS chunks_acknowledged,
    greatest(r.chunks_failed, a.failed) AS chunks_failed,
    CASE WHEN r.status IN ('running', 'crashed') THEN NULL ELSE r.chunks_left END AS chunks_left,
    greatest(r.identifiers_sent, a.sent) AS identifiers_sent,
    greatest(r.nb_valid_identifiers, a.valid) AS nb_valid_identifiers,
    greatest(r.nb_invalid_identifiers, a.invalid) AS nb_invalid_identifiers,
    r.error
FROM (SELECT * FROM syncd.sync_runs ORDER BY id DESC LIMIT $1) r
CROSS JOIN LATERAL (
    SELECT coalesce(sum(changes_consumed), 0) AS changes, coalesce(sum(rejected), 0) AS rejected,
        coalesce(sum(suppressed), 0) AS suppressed,
        coalesce(sum(chunks), 0) AS chunks
    FROM syncd.plans WHERE run_id = r.id
) p
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE outcome = 'acknowledged') AS acknowledged,
        count(*) FILTER (WHERE outcome = 'failed') AS failed,
        coalesce(sum(identifiers_sent) FILTER (WHERE outcome = 'acknowledged'), 0) AS sent,
        coalesce(sum(nb_valid_identifiers), 0) AS valid,
        coalesce(sum(nb_invalid_identifiers), 0) AS invalid
    FROM syncd.push_audit WHERE run_id = r.id
) a
ORDER BY r.id DESC;

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
-- Inbox rows of linked change-log segments that the next plan will consume.
SELECT count(*) FROM syncd.membership_changes m
WHERE EXISTS (SELECT 1 FROM syncd.segments s
              WHERE s.segment_key = m.segment_key AND s.mirror_relation IS NULL);

-- name: waiting_mirrored
-- Inbox rows of mirror-linked keys: a mirror reads its relation, not the inbox, so they wait
-- (kept, not dropped) until the key is linked to read changes again, or deleted by the CRM.
SELECT s.segment_key, s.mirror_relation, count(*) AS changes
FROM syncd.membership_changes m JOIN syncd.segments s ON s.segment_key = m.segment_key
WHERE s.mirror_relation IS NOT NULL
GROUP BY 1, 2 ORDER BY 1;

-- name: blocked_segments
-- Segments whose latest plan the mass-removal guard held back, and whether approved.
SELECT segment_key, blocked_at, blocked_removes, blocked_members, removals_approved
FROM syncd.segments WHERE blocked_at IS NOT NULL ORDER BY segment_key;

-- name: unsendable_chunks
-- Open chunks no run can send (no target recorded: planned before syncd recorded each
-- chunk's target, for a link since removed or re-linked with another identifier type).
-- Claims pass over them; only later chunks of their own key wait behind them.
SELECT c.segment_key, count(*) AS chunks, sum(c.identifier_count) AS identifiers
FROM syncd.chunks c
WHERE c.state <> 'done' AND c.api IS NULL
GROUP BY c.segment_key ORDER BY c.segment_key;

-- name: chunks_of_unknown_apps
-- Open chunks planned for a Criteo app that is no longer configured ($1: the apps that
-- are): no run can send them until the app is configured again or their key unlinked.
SELECT c.app, c.segment_key, count(*) AS chunks, sum(c.identifier_count) AS identifiers
FROM syncd.chunks c
WHERE c.state <> 'done' AND NOT (c.app = ANY($1::text[]))
GROUP BY c.app, c.segment_key ORDER BY c.app, c.segment_key;

-- name: missed_windows
-- Windows of the last $1 days, already passed, that runs targeted and none made (a run
-- that ended late or left work, or crashed), newest first, at most $2.
SELECT r.target_window, count(*) AS runs, max(r.id) AS last_run,
    string_agg(DISTINCT r.status, ', ') AS statuses,
    (array_agg(r.chunks_left ORDER BY r.id DESC))[1] AS chunks_left
FROM syncd.sync_runs r
WHERE r.target_window <= now() AND r.target_window > now() - make_interval(days => $1)
GROUP BY r.target_window
HAVING NOT bool_or(coalesce(r.made_window, false)) AND bool_and(r.status <> 'running')
ORDER BY r.target_window DESC
LIMIT $2;

-- name: last_finished_run
-- What `syncd check` judges: the latest run that ended on its own (an interrupted run was
-- stopped by a shutdown; the next one continues its work).
SELECT id, status, made_window, target_window, finished_at, error
FROM syncd.sync_runs
WHERE status IN ('succeeded', 'failed', 'crashed')
ORDER BY id DESC LIMIT 1;

-- name: api_notice
-- The API version the latest run that talked to Criteo used, if Criteo called it
-- deprecated then: the version, the sunset date, the days left. No row otherwise.
SELECT api_version, api_sunset,
    floor(extract(epoch FROM api_sunset - now()) / 86400)::int AS days_left
FROM (
    SELECT api_version, api_deprecated, api_sunset FROM syncd.sync_runs
    WHERE api_version IS NOT NULL ORDER BY id DESC LIMIT 1
) latest
WHERE api_deprecated;

-- name: last_verifications
-- Each segment's latest post-window verification: Criteo's count against syncd's.
SELECT DISTINCT ON (segment_key)
    segment_key, verified_window, read_at, supported, number_of_identifiers, acknowledged
FROM syncd.segment_stats
WHERE verified_window IS NOT NULL
ORDER BY segment_key, read_at DESC;
