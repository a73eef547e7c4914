-- Each chunk records the target it was planned for.
--
-- Until now a chunk found its Criteo segment through its key's current link, at claim
-- time and again when its audit row was written. A key unlinked or re-linked while a
-- plan ran left chunks that no link served (the claim found none and stopped every
-- push), or chunks normalised for one identifier type sent as another, and a re-pointed
-- link silently redirected chunks planned for the old segment. Now the plan copies its
-- link, read and locked in the plan's own transaction, into every chunk; the claim, the
-- request and the audit row use the chunk's copy, which never changes afterwards.
ALTER TABLE syncd.chunks
    ADD COLUMN api               text,
    ADD COLUMN criteo_segment_id text,
    ADD COLUMN account_id        text,
    ADD COLUMN gum_caller_id     bigint,
    ADD COLUMN send_as           text;
COMMENT ON COLUMN syncd.chunks.api IS
    'The target the chunk was planned for (with criteo_segment_id, identifier_type, '
    'account_id, gum_caller_id, send_as); NULL: none known, the chunk cannot be sent';

-- Chunks still open take the target of their key's current link, when that link still
-- has the identifier type they were planned for. The others (their key unlinked, or
-- re-linked with another type) stay without a target: no run sends them, `syncd status`
-- lists them, `syncd segments unlink KEY --force` drops them. Acknowledged chunks keep
-- no target: which link they went through is in their audit rows.
UPDATE syncd.chunks c
SET api = s.api, criteo_segment_id = s.criteo_segment_id, account_id = s.account_id,
    gum_caller_id = s.gum_caller_id, send_as = s.send_as
FROM syncd.segments s
WHERE s.segment_key = c.segment_key AND s.identifier_type = c.identifier_type
  AND c.state <> 'done';

-- The audit row names the whole target the request went to: gumCallerId is part of it.
ALTER TABLE syncd.push_audit ADD COLUMN gum_caller_id bigint;
