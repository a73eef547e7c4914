-- The ledger: per Criteo segment, the identifiers (as sent) Criteo has acknowledged.
--
-- Two parts, so that keeping it costs the push path nothing:
--   * its log is the acknowledged chunks themselves: finish_chunk now keeps an
--     acknowledged chunk's payload (it used to drop it), in the same statement that
--     records the outcome and the audit row, fenced by the same lease. A failed, deferred
--     or taken-over chunk is never 'done', so it never enters the log;
--   * syncd.ledger is the log folded into one row per (segment, identifier): the
--     `fold_ledger` query applies the acknowledged chunks whose payload is still there in
--     plan order (a remove after an add leaves nothing), then drops their payloads.
-- Every run folds after its last chunk, when Criteo already has everything: the fold's
-- index work (the cost of a ledger: about as much PostgreSQL CPU as planning the same
-- changes, measured 2026-12-01) never delays a change on its way to a window. Readers
-- (mirror diffs, resync, verification, erasure) fold first, so they always see it whole.
-- Plans are pruned only once folded.
--
-- Keyed by the Criteo target (api, segment id), not by the CRM segment key: it describes
-- a list on Criteo's side, and a key re-linked to another segment starts from that
-- segment's own ledger. Identifiers acknowledged before this migration are not known (their
-- payloads are gone): the ledger of a segment synced by an older syncd starts with the
-- changes made after it. Chunks of two keys linked to one Criteo segment are folded in plan
-- order, which is their planning order, not necessarily their acknowledgement order.
--
-- Compact because it grows with every list: a target is a 4-byte id, and an identifier is
-- packed into bytea (a lower-case hex string, which is what every hashed identifier is, as
-- its bytes: 33 bytes instead of 65 for a SHA-256). Measured on 800,000 SHA-256 rows: 111 MB,
-- against 211 MB for (api text, segment id text, identifier text) keys.
CREATE TABLE syncd.ledger_targets (
    id                integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    api               text NOT NULL,
    criteo_segment_id text NOT NULL,
    UNIQUE (api, criteo_segment_id)
);

-- No foreign key to ledger_targets: its check would cost one index probe per identifier
-- written; only syncd.ledger_target() hands out target ids.
CREATE TABLE syncd.ledger (
    target_id  integer NOT NULL,
    identifier bytea NOT NULL,
    PRIMARY KEY (target_id, identifier)
);
COMMENT ON TABLE syncd.ledger IS
    'Per Criteo segment (ledger_targets), the identifiers (as sent, packed by '
    'syncd.ledger_pack) Criteo has acknowledged, up to the last fold; the acknowledged '
    'chunks that still hold a payload are the rest. Read it through syncd.ledger_members';

-- The target id of a Criteo segment, created on first use. Two finishing chunks of one
-- new target may race to create it: ON CONFLICT lets one insert win, both read its id.
CREATE FUNCTION syncd.ledger_target(p_api text, p_segment_id text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    found integer;
BEGIN
    SELECT id INTO found FROM syncd.ledger_targets
    WHERE api = p_api AND criteo_segment_id = p_segment_id;
    IF found IS NULL THEN
        INSERT INTO syncd.ledger_targets (api, criteo_segment_id) VALUES (p_api, p_segment_id)
        ON CONFLICT DO NOTHING;
        SELECT id INTO found FROM syncd.ledger_targets
        WHERE api = p_api AND criteo_segment_id = p_segment_id;
    END IF;
    RETURN found;
END
$$;

-- An identifier as stored: a tag byte, then its bytes. Tag 0: an even-length lower-case
-- hex string (SHA-256, MD5 and SHA-256-of-MD5 hashes), stored decoded; tag 1: anything
-- else, its UTF-8 bytes. Lossless both ways: ledger_unpack(ledger_pack(x)) = x. Declared
-- STABLE, like convert_to inside it, and not STRICT, so that PostgreSQL inlines it: called
-- as a function it cost 3.4 s per 800,000 identifiers instead of about 1 s.
CREATE FUNCTION syncd.ledger_pack(identifier text) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN octet_length(identifier) % 2 = 0 AND identifier ~ '^[0-9a-f]+$'
        THEN '\x00'::bytea || decode(identifier, 'hex')
        ELSE '\x01'::bytea || convert_to(identifier, 'UTF8')
    END
$$;

-- Reading back (STABLE: convert_from depends on the encoding). Readers compare packed
-- values where they can, so this is off the hot paths.
CREATE FUNCTION syncd.ledger_unpack(packed bytea) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE get_byte(packed, 0)
        WHEN 0 THEN encode(substring(packed FROM 2), 'hex')
        ELSE convert_from(substring(packed FROM 2), 'UTF8')
    END
$$;

CREATE VIEW syncd.ledger_members AS
SELECT t.api, t.criteo_segment_id, syncd.ledger_unpack(l.identifier) AS identifier
FROM syncd.ledger l JOIN syncd.ledger_targets t ON t.id = l.target_id;
COMMENT ON VIEW syncd.ledger_members IS
    'The ledger, readable: per Criteo segment, the identifiers (as sent) Criteo acknowledged';

-- The log: acknowledged chunks still holding their payload, found in plan order.
CREATE INDEX chunks_unfolded ON syncd.chunks (plan_id, id)
    WHERE state = 'done' AND payload IS NOT NULL;
