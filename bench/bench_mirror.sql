-- bench_mirror.py's statements, in named blocks (`-- name: x`) as syncd's own queries are.
-- Parameters are asyncpg's $1, $2, ...

-- name: create_bench
-- Member k's rows for k in generate_series(first, last, step): its email (mixed case,
-- sometimes padded or followed by a tab, like bench_sync's changes); for k % 1000 = 3 a
-- second row with the same member upper-cased (the diff must count it once); for
-- k % 1000 = 7 an invalid value (rejected, never sent). Neither extra row falls on
-- k % 40 = 1 (1000 is a multiple of 40), so removing the members k % 40 = 1 removes whole
-- members. One generator for the mirror's rows and for the change log's.
CREATE SCHEMA bench;
CREATE FUNCTION bench.member_rows(first bigint, last bigint, step bigint)
RETURNS SETOF text LANGUAGE sql IMMUTABLE AS $$
    SELECT v.identifier
    FROM generate_series(first, last, step) AS k,
    LATERAL (VALUES
        ((CASE WHEN k % 7 = 0 THEN '  ' ELSE '' END)
         || (CASE WHEN k % 5 = 0 THEN 'User' ELSE 'user' END) || k::text
         || (CASE WHEN k % 3 = 0 THEN '@Example.COM' ELSE '@example.com' END)
         || (CASE WHEN k % 11 = 0 THEN E'\t' ELSE '' END)),
        (CASE WHEN k % 1000 = 3 THEN 'USER' || k::text || '@EXAMPLE.COM' END),
        (CASE WHEN k % 1000 = 7 THEN 'not-an-email-' || k::text END)
    ) AS v(identifier)
    WHERE v.identifier IS NOT NULL
$$;

-- name: create_members
-- The mirror source: what a CRM keeps, with the two columns a mirror link reads.
CREATE SCHEMA crm;
CREATE TABLE crm.members (segment_key text NOT NULL, identifier text NOT NULL);

-- name: insert_members
-- Members k in generate_series($1, $2, $3) into the mirror, key $4.
INSERT INTO crm.members (segment_key, identifier)
SELECT $4, m FROM bench.member_rows($1, $2, $3) AS m;

-- name: delete_members
-- The members k < $2 with k % 40 = 1 (their only row each: see create_bench), key $1.
DELETE FROM crm.members
WHERE segment_key = $1 AND identifier LIKE '%@%'
  AND substring(identifier FROM '[0-9]+')::bigint % 40 = 1
  AND substring(identifier FROM '[0-9]+')::bigint < $2;

-- name: insert_changes
-- Members k in generate_series($1, $2, $3) as inbox changes of key $4, operation $5.
INSERT INTO syncd.membership_changes (segment_key, identifier, operation, changed_at)
SELECT $4, m, $5, now() FROM bench.member_rows($1, $2, $3) AS m;

-- name: check_sent
-- What a run's ($1) acknowledged chunks carried against what was expected: adds of the
-- members k in [$2, $3], removes of k in generate_series($4, $5, $6), as SHA-256 of their
-- normalised email. Both ways, with multiplicity: 0 and 0 means exactly those, once each.
WITH sent AS (
    SELECT c.operation, e.v
    FROM syncd.chunks c JOIN syncd.plans p ON p.id = c.plan_id,
        json_array_elements_text(convert_from(c.payload, 'UTF8')::json) AS e(v)
    WHERE p.run_id = $1 AND c.state = 'done'
), expected AS (
    SELECT 'add'::text AS operation, k FROM generate_series($2::bigint, $3::bigint) AS k
    UNION ALL
    SELECT 'remove', k FROM generate_series($4::bigint, $5::bigint, $6::bigint) AS k
), hashed AS (
    SELECT operation,
        encode(sha256(convert_to('user' || k || '@example.com', 'UTF8')), 'hex') AS v
    FROM expected
)
SELECT (SELECT count(*) FROM sent) AS sent,
    (SELECT count(*) FROM (SELECT * FROM sent EXCEPT ALL SELECT * FROM hashed) AS x)
        AS unexpected,
    (SELECT count(*) FROM (SELECT * FROM hashed EXCEPT ALL SELECT * FROM sent) AS y)
        AS missing;

-- name: check_ledger
-- A target's folded ledger ($1 segment id) against the members expected: k in [0, $2)
-- except those below $3 with k % 40 = 1.
WITH mine AS (
    SELECT identifier AS packed FROM syncd.ledger
    WHERE target_id = (SELECT id FROM syncd.ledger_targets WHERE criteo_segment_id = $1)
), expected AS (
    SELECT syncd.ledger_pack(encode(sha256(convert_to('user' || k || '@example.com', 'UTF8')),
        'hex')) AS packed
    FROM generate_series(0::bigint, $2::bigint - 1) AS k
    WHERE NOT (k < $3 AND k % 40 = 1)
)
SELECT (SELECT count(*) FROM mine) AS members,
    (SELECT count(*) FROM (SELECT * FROM mine EXCEPT ALL SELECT * FROM expected) AS x)
        AS unexpected,
    (SELECT count(*) FROM (SELECT * FROM expected EXCEPT ALL SELECT * FROM mine) AS y)
        AS missing;

-- name: audit_of_last_run
-- The last run's acknowledged requests and identifiers, per operation.
SELECT operation, count(*) AS requests, sum(identifiers_sent) AS identifiers
FROM syncd.push_audit
WHERE run_id = (SELECT max(id) FROM syncd.sync_runs) AND outcome = 'acknowledged'
GROUP BY operation;
