-- Incremental mirror diffs (issue 13, item 5). A full diff reads, normalises and hashes a
-- mirror's whole relation and compares it with the ledger both ways: about 5 s per million
-- members, changed or not (measured 2026-12-01), where a change log reads only its changes.
--
-- syncd.mirror_rows keeps each key's source rows as last diffed, with their values as sent
-- (packed like the ledger; NULL: rejected). The next diff compares the relation with it
-- (one hash join on the raw text) and normalises, hashes and nets only what changed. That
-- is exact as long as what Criteo has of the target is what the rows say minus the
-- suppressed, which syncd.mirror_state records the conditions of: no chunk of any other plan
-- for the target since (a forget, a resync, another key linked to the same Criteo segment),
-- the same suppressions of the type (count and latest time: a removal or an addition shows),
-- the same target and relation, and a full diff less than a day old (the safety net, and
-- less than SYNCD_RETENTION_DAYS' minimum, so no such plan is pruned before it is seen).
-- Otherwise the diff is full and rewrites the rows.
--
-- A cache of a pure function (the value sent depends on the link's type and send_as, which
-- a link never changes): unlinking drops a key's rows. A migration that changes
-- normalisation must empty these tables. No unique index: rows are written under the
-- segment's plan lock, and a (segment_key, raw) key would cost a 1M first sync seconds.
--
-- Both UNLOGGED: a cache needs no WAL (a first sync of 4M members wrote it in 42 s logged),
-- and PostgreSQL empties unlogged tables together after a crash and a standby never has
-- them, so a crash or a failover only means that the next diff is full.
CREATE UNLOGGED TABLE syncd.mirror_rows (
    segment_key text NOT NULL,
    raw         text COLLATE "C" NOT NULL,
    packed      bytea
);
CREATE INDEX mirror_rows_key ON syncd.mirror_rows (segment_key);

CREATE UNLOGGED TABLE syncd.mirror_state (
    segment_key       text PRIMARY KEY,
    api               text NOT NULL,
    criteo_segment_id text NOT NULL,
    relation          text NOT NULL,
    plan_id           bigint NOT NULL,   -- the plan that brought mirror_rows up to date
    suppressions      bigint NOT NULL,   -- the type's suppressions then: how many,
    suppressed_at     timestamptz,       -- and the latest
    full_at           timestamptz NOT NULL
);
