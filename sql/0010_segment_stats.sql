-- Criteo's contact-list statistics, one row per reading (`syncd segments stats`, and the
-- daemon's post-window verification next): what Criteo says a list holds and matches,
-- kept with when it was read, so a trend or a divergence can be shown later.
CREATE TABLE syncd.segment_stats (
    id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    segment_key            text NOT NULL,
    api                    text NOT NULL,
    criteo_segment_id      text NOT NULL,
    read_at                timestamptz NOT NULL DEFAULT now(),
    -- false: Criteo does not compute statistics for this list
    -- (contact-list-statistics-not-supported); the counts are then NULL.
    supported              boolean NOT NULL,
    number_of_identifiers  bigint,
    number_of_matches      bigint,
    match_rate             double precision
);
CREATE INDEX segment_stats_by_key ON syncd.segment_stats (segment_key, read_at DESC);
