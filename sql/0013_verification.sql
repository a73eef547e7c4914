-- Post-window verification: some hours after each window the daemon compares what Criteo
-- says each linked list holds (its contact-list statistics) with what syncd has acknowledged
-- (the ledger). One verification per window across replicas: the row that only one
-- insert wins; each segment's reading is kept in segment_stats with the ledger's count.
CREATE TABLE syncd.verifications (
    window_at   timestamptz PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now(),
    host        text NOT NULL
);
ALTER TABLE syncd.segment_stats
    ADD COLUMN acknowledged    bigint,      -- the ledger's count for the segment then
    ADD COLUMN verified_window timestamptz; -- the window the reading verified, if any
