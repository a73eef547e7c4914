-- Privacy: erasure with proof, and a suppression list no segment can re-add past.
--
-- Nothing here holds a plain identifier. A person is named by a suppression key: the
-- SHA-256 hex of the identifier's canonical form, which is exactly the value syncd sends
-- for an email or a phone number hashed the default way (for a phone number, the digits
-- without '+'); for the types sent in clear (madid, identityLink, customerId, gum, ...)
-- and for links that send emails or phone numbers in clear (--send-as plain) it is that
-- same SHA-256 of the value sent, never the value. An identifier given already hashed (a
-- SHA-256 or, for emails, an MD5 hex) is its own key: syncd cannot hash it again in a way
-- that matches the address it stands for, so a suppression of an MD5 matches that MD5.

-- The key of a value as sent (`identifier_to_send`) under a link's send_as: the same for
-- every send_as, so one suppression holds for every segment of the type. Inlined (a single
-- CASE, STABLE like convert_to): for the default sha256 emails and phone numbers it is the
-- value itself, with no per-row hashing on the plan's hot path.
-- Reuse, e.g. in a mirror diff (an add's value as sent `d.value`, the link's type $t and
-- send_as $s):
--   AND syncd.suppression_key(d.value, $t, $s) NOT IN
--       (SELECT hashed_identifier FROM syncd.suppressions WHERE identifier_type = $t)
-- which PostgreSQL runs as a hashed subplan (one hash of the list per statement, one probe
-- per row); see plan_segment in syncd/db/queries/plan.sql.
CREATE FUNCTION syncd.suppression_key(value text, identifier_type text, send_as text)
RETURNS text LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE
    WHEN send_as = 'sha256' AND identifier_type IN ('email', 'phoneNumber') THEN value
    WHEN syncd.identifier_is_hashed(value, identifier_type) THEN value
    WHEN identifier_type = 'phoneNumber'
        THEN encode(sha256(convert_to(substr(value, 2), 'UTF8')), 'hex')
    ELSE encode(sha256(convert_to(value, 'UTF8')), 'hex')
END;

-- Who may never be added again, per identifier type (one suppression holds for every
-- segment of the type, both APIs, from the inbox or a mirror source). Removes still go.
CREATE TABLE syncd.suppressions (
    identifier_type   text NOT NULL,
    hashed_identifier text COLLATE "C" NOT NULL CHECK (hashed_identifier ~ '^[0-9a-f]+$'),
    reason            text NOT NULL,
    source            text NOT NULL CHECK (source IN ('forget', 'consent_withdrawal')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (identifier_type, hashed_identifier)
);

-- The proof: one row per forget (a command or a consent withdrawal) and linked segment it
-- queued a remove in (segment_key NULL: no segment of the type was linked then). The
-- remove is the chunk of plan_id for that segment; its audit row says when Criteo
-- acknowledged it. Kept when the suppression is lifted: the erasure happened.
CREATE TABLE syncd.erasures (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    identifier_type   text NOT NULL,
    hashed_identifier text COLLATE "C" NOT NULL,
    source            text NOT NULL CHECK (source IN ('forget', 'consent_withdrawal')),
    requested_at      timestamptz NOT NULL DEFAULT now(),
    plan_id           bigint,
    segment_key       text,
    api               text,
    criteo_segment_id text,
    held_in_ledger    boolean
);
CREATE INDEX erasures_identifier_idx ON syncd.erasures (identifier_type, hashed_identifier);
-- The proof reads a plan's audit rows.
CREATE INDEX push_audit_plan_idx ON syncd.push_audit (plan_id);

-- A forget's removes are planned outside a run (`syncd forget`): their plan has no run.
ALTER TABLE syncd.plans ALTER COLUMN run_id DROP NOT NULL;
ALTER TABLE syncd.plans ADD COLUMN suppressed bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN syncd.plans.suppressed IS
    'Net adds not sent because the identifier is suppressed (syncd.suppressions)';
ALTER TABLE syncd.sync_runs ADD COLUMN identifiers_suppressed bigint NOT NULL DEFAULT 0;

-- The CRM's way to withdraw consent without a command: insert the plain value; each run
-- treats every row as a `syncd forget` and deletes it (no plain copy is kept).
CREATE TABLE syncd.consent_withdrawals (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    identifier      text,
    identifier_type text NOT NULL DEFAULT 'email',
    reason          text,
    received_at     timestamptz NOT NULL DEFAULT now()
);

-- A withdrawal syncd could not act on (an unknown type, a value that is no identifier):
-- deleted from consent_withdrawals like the others, and recorded here without the value,
-- so that `syncd status` says the CRM must send it again, corrected.
CREATE TABLE syncd.consent_withdrawal_refusals (
    withdrawal_id   bigint PRIMARY KEY,
    identifier_type text,  -- syncd's name for it; NULL when it names no type syncd knows
    problem         text NOT NULL,
    received_at     timestamptz NOT NULL,
    refused_at      timestamptz NOT NULL DEFAULT now()
);
