-- The demo's own queries (`syncd demo`), named like queries.sql.

-- name: demo_history
-- A CRM history written by PostgreSQL itself: customers join and leave segments over
-- time; about 1 in 400 values is unusable (no '@', blank, a malformed phone number);
-- 5% of the changes carry a segment key nobody linked.
INSERT INTO syncd.membership_changes (segment_key, identifier, operation, changed_at)
SELECT seg.key,
    CASE
        WHEN g % 401 = 0 THEN (ARRAY['', 'not-an-email', 'jane.doe(at)example.com',
                                     '12-34'])[1 + (g / 400) % 4]
        WHEN seg.kind = 'email' THEN
            (CASE WHEN g % 7 = 0 THEN '  ' ELSE '' END)
            || (CASE WHEN g % 5 = 0 THEN 'Customer' ELSE 'customer' END)
            || (g * 7919 % ($1 / 3))::text || '@'
            || (ARRAY['Example.com', 'shop.example', 'mail.example.org'])[1 + g % 3]
        WHEN seg.kind = 'phoneNumber' THEN
            '+33 6 ' || lpad((g * 104729 % 1000000)::text, 6, '0')
                || ' ' || lpad((g % 97)::text, 2, '0')
        ELSE md5((g * 31 % ($1 / 4))::text)::uuid::text
    END,
    CASE WHEN g % 4 = 0 THEN 'remove' ELSE 'add' END,
    now() - make_interval(secs => ($1 - g) * 0.5)
FROM generate_series(1::bigint, $1) AS g
CROSS JOIN LATERAL (
    SELECT CASE
        WHEN g % 100 < 35 THEN 'vip_customers'
        WHEN g % 100 < 70 THEN 'newsletter'
        WHEN g % 100 < 85 THEN 'sms_optin'
        WHEN g % 100 < 95 THEN 'app_users'
        ELSE 'winback_2027'
    END AS key,
    CASE
        WHEN g % 100 < 70 OR g % 100 >= 95 THEN 'email'
        WHEN g % 100 < 85 THEN 'phoneNumber'
        ELSE 'madid'
    END AS kind
) seg;

-- name: demo_audit
-- Per segment and operation, what the audit table says Criteo accepted.
SELECT segment_key, api, criteo_segment_id, operation, count(*) AS requests,
    sum(identifiers_sent) AS sent, sum(nb_valid_identifiers) AS valid,
    sum(nb_invalid_identifiers) AS invalid, string_agg(DISTINCT outcome, ',') AS outcomes
FROM syncd.push_audit GROUP BY 1, 2, 3, 4 ORDER BY 1, 4;
