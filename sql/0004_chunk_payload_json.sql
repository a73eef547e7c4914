-- Chunk payloads stored as the bytes sent: the UTF-8 JSON array of identifiers.
--
-- A pusher streams the payload into the request body in slices (substring() on an
-- uncompressed out-of-line value reads only the TOAST chunks it covers), so syncd never
-- holds a whole 50,000-identifier body in memory, however many requests are in flight:
-- its memory no longer grows with the size of the chunks, and so with N.
-- JSON-encoding moves from each claim to the plan, which encodes each chunk once.
ALTER TABLE syncd.chunks ADD COLUMN payload bytea;
-- Hex digests barely compress: stored out of line, uncompressed, sliceable.
ALTER TABLE syncd.chunks ALTER COLUMN payload SET STORAGE EXTERNAL;
UPDATE syncd.chunks SET payload = convert_to(array_to_json(identifiers)::text, 'UTF8')
WHERE identifiers IS NOT NULL;
ALTER TABLE syncd.chunks DROP COLUMN identifiers;
COMMENT ON COLUMN syncd.chunks.payload IS
    'The identifiers as sent: a UTF-8 JSON array of strings; NULL once Criteo acknowledged it';
