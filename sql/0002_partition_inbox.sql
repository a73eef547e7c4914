-- The inbox, hash-partitioned by segment key.
--
-- A plan drains one segment at a time, and a CRM writes every segment's changes
-- interleaved, so in one heap each plan had to visit nearly every page of the inbox:
-- 40 segments meant 40 passes over it. With 16 partitions a segment's rows sit in one
-- partition holding about a sixteenth of the inbox. Measured on 2 cores: planning 4M
-- changes over 40 segments went from 35.6 to 24.3 CPU-seconds, 1M from 6.1 to 5.4.
-- For the CRM nothing changes: it inserts into syncd.membership_changes as before.
-- (An explicit sequence rather than an identity column keeps PostgreSQL 13-16 supported:
-- identity columns on partitioned tables need 17.)

ALTER TABLE syncd.membership_changes RENAME TO membership_changes_v1;
ALTER INDEX syncd.membership_changes_pkey RENAME TO membership_changes_v1_pkey;
ALTER INDEX syncd.membership_changes_segment_key_idx RENAME TO membership_changes_v1_segment_key_idx;

CREATE SEQUENCE syncd.membership_change_ids AS bigint;

CREATE TABLE syncd.membership_changes (
    id          bigint      NOT NULL DEFAULT nextval('syncd.membership_change_ids'),
    segment_key text        NOT NULL,
    -- NULL is allowed so that a CRM trigger never fails the CRM's own transaction;
    -- a NULL or invalid identifier is rejected visibly by the plan, never sent.
    identifier  text,
    operation   text        NOT NULL
        CONSTRAINT membership_changes_operation_check CHECK (operation IN ('add', 'remove')),
    changed_at  timestamptz NOT NULL DEFAULT now(),
    -- Leads with the partition key, as a partitioned table's primary key must; it is also
    -- the index a plan finds its segment's rows with.
    PRIMARY KEY (segment_key, id)
) PARTITION BY HASH (segment_key);
ALTER SEQUENCE syncd.membership_change_ids OWNED BY syncd.membership_changes.id;

CREATE TABLE syncd.membership_changes_p00 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 0);
CREATE TABLE syncd.membership_changes_p01 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 1);
CREATE TABLE syncd.membership_changes_p02 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 2);
CREATE TABLE syncd.membership_changes_p03 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 3);
CREATE TABLE syncd.membership_changes_p04 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 4);
CREATE TABLE syncd.membership_changes_p05 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 5);
CREATE TABLE syncd.membership_changes_p06 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 6);
CREATE TABLE syncd.membership_changes_p07 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 7);
CREATE TABLE syncd.membership_changes_p08 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 8);
CREATE TABLE syncd.membership_changes_p09 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 9);
CREATE TABLE syncd.membership_changes_p10 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 10);
CREATE TABLE syncd.membership_changes_p11 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 11);
CREATE TABLE syncd.membership_changes_p12 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 12);
CREATE TABLE syncd.membership_changes_p13 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 13);
CREATE TABLE syncd.membership_changes_p14 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 14);
CREATE TABLE syncd.membership_changes_p15 PARTITION OF syncd.membership_changes FOR VALUES WITH (MODULUS 16, REMAINDER 15);

-- Changes already waiting keep their ids (their order), and new ids continue after them.
INSERT INTO syncd.membership_changes (id, segment_key, identifier, operation, changed_at)
SELECT id, segment_key, identifier, operation, changed_at FROM syncd.membership_changes_v1;
SELECT setval('syncd.membership_change_ids',
              coalesce((SELECT max(id) FROM syncd.membership_changes_v1), 0) + 1, false);
DROP TABLE syncd.membership_changes_v1;
