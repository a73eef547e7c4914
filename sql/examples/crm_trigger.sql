-- Example: feed syncd's inbox from the CRM's own membership table with a trigger.
--
-- Assumes a CRM table with one row per member of a segment, unique on the value syncd
-- will send (for emails: trimmed and lower-cased, as syncd normalises them):
--
--   CREATE TABLE crm.segment_members (
--       segment_key text NOT NULL,
--       email       text NOT NULL,
--       ...
--   );
--   CREATE UNIQUE INDEX segment_members_person ON crm.segment_members
--       (segment_key, lower(btrim(email)));
--
-- The trigger runs inside the CRM's transaction: the change reaches syncd exactly when
-- (and only if) the CRM's own change commits. NULL or invalid emails do not fail the
-- CRM's transaction; syncd rejects them visibly (syncd.rejected_identifiers).
--
-- The ordering contract. When one plan sees several changes of one person in one
-- segment, the one with the highest id wins. Ids are drawn when a row is inserted, not
-- when its transaction commits, so two CRM transactions changing the same membership
-- at the same time could commit in the opposite order to their ids, and syncd would
-- keep the change the CRM overwrote. This trigger rules that out:
--   * It is an AFTER ROW trigger: the inbox row, and its id, are created after the
--     CRM's own row change, that is while the CRM holds that row's lock (UPDATE and
--     DELETE lock the row; an INSERT holds its unique index entry).
--   * A second transaction changing the same membership (same segment, same person)
--     waits on that lock, or on the unique index, until the first one commits or rolls
--     back; only then does its own trigger draw an id.
--   So for one person in one segment, id order is commit order.
-- What that needs from the CRM: one row per (segment, person as sent), which the unique
-- index above enforces (two rows 'Jane@x.com' and 'jane@x.com' would not lock each
-- other), and every membership change going through that table. A BEFORE trigger
-- would not do: it draws the id before an INSERT waits on the unique index.
--
-- A CRM that writes the inbox directly instead must take an equivalent lock first, in
-- the same transaction, before inserting (collisions of hashtext only make unrelated
-- writers wait a little):
--
--   SELECT pg_advisory_xact_lock(hashtext('crm.segment_members'),
--                                hashtext(segment_key || ' ' || lower(btrim(email))));
--   INSERT INTO syncd.membership_changes (segment_key, identifier, operation) VALUES (...);
--
-- Changes committed later than a plan are taken by the next plan, whatever their id,
-- and a later plan of a segment is sent only after the earlier one: across plans,
-- order is commit order by construction.

CREATE OR REPLACE FUNCTION crm.segment_members_to_syncd() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- An UPDATE that moves a member (another segment or another email) is a remove of
    -- the old membership then an add of the new one, in that order (increasing ids).
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO syncd.membership_changes (segment_key, identifier, operation)
        VALUES (OLD.segment_key, OLD.email, 'remove');
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO syncd.membership_changes (segment_key, identifier, operation)
        VALUES (NEW.segment_key, NEW.email, 'add');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER segment_members_to_syncd
AFTER INSERT OR UPDATE OF segment_key, email OR DELETE ON crm.segment_members
FOR EACH ROW EXECUTE FUNCTION crm.segment_members_to_syncd();
