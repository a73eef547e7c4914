-- Example: feed syncd's inbox from the CRM's own membership table with a trigger.
-- Assumes a CRM table crm.segment_members(segment_key text, email text, ...).
-- The trigger runs inside the CRM's transaction: the change reaches syncd exactly when
-- (and only if) the CRM's own change commits. NULL or invalid emails do not fail the
-- CRM's transaction; syncd rejects them visibly (syncd.rejected_identifiers).

CREATE OR REPLACE FUNCTION crm.segment_members_to_syncd() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
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
