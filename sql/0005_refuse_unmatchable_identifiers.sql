-- Identifiers that cannot match are refused, not hashed and sent; case mapping that does
-- not depend on the database's collation.
--
-- syncd.identifiers (Python) holds the same rules; the tests hold the two equal, code
-- point by code point for the character classes below.
--
-- NEEDS PostgreSQL 18 or later and a UTF8 database: non-ASCII values are lower-cased under
-- the built-in collation pg_unicode_fast (added in PostgreSQL 18; builtin provider, UTF8
-- only), which does full Unicode case mapping like Python's str.lower(): 'İ' -> 'i̇',
-- 'ẞ' -> 'ß', a final 'Σ' -> 'ς'. The database's own collation did it before, so the same
-- address hashed differently from one server to another (glibc lowers 'İ' to 'i') and
-- from Python's. PostgreSQL 17's pg_c_utf8 only does simple case mapping ('İ' -> 'i').
-- pg_unicode_fast uses PostgreSQL's own Unicode tables (unicode_version(), 16.0 in 18),
-- never the operating system's: only characters assigned after the Unicode version of
-- the Python that computes a hash elsewhere can map differently (27 code points between
-- Python 3.11's Unicode 14 and 16.0, all unassigned in 14).
DO $check$
BEGIN
    IF current_setting('server_version_num')::int < 180000 THEN
        RAISE EXCEPTION 'syncd needs PostgreSQL 18 or later (this server is %): identifiers '
            'are lower-cased under the collation pg_unicode_fast', current_setting('server_version');
    END IF;
    IF current_setting('server_encoding') <> 'UTF8' THEN
        RAISE EXCEPTION 'syncd needs a UTF8 database (this one is %)',
            current_setting('server_encoding');
    END IF;
END
$check$;

-- The rules, for every identifier type:
--   - Unicode whitespace (the 25 code points of the White_Space property: space, tab,
--     line feed, vertical tab, form feed, carriage return, U+0085, no-break space U+00A0,
--     U+1680, U+2000-U+200A, line and paragraph separators U+2028/U+2029, U+202F, U+205F,
--     U+3000) is trimmed at both ends;
--   - inside, whitespace is refused ('contains_whitespace'; phone numbers drop it as a
--     separator instead), then control characters U+0001-U+001F and U+007F-U+009F
--     ('contains_control_character'), then invisible characters, the Unicode
--     Default_Ignorable_Code_Point property: soft hyphen, zero-width space and joiners,
--     bidirectional marks, word joiner, variation selectors, byte order mark, Hangul
--     fillers, tags ('contains_invisible_character');
--   - an email address is at most 254 characters ('too_long'), the others keep theirs;
--   - phone numbers: whitespace, dots and dashes dropped, then every '(0)' (a national
--     trunk prefix written after the country code: '+44 (0)20 7946 0958' is
--     +442079460958), then brackets; a leading 00 is read as +.
-- Code points are spelled out (regular expression escapes, code point ranges): neither
-- the classes nor their ranges depend on the database's locale.

-- Unicode whitespace trimmed from both ends (segment keys are held to the same set).
CREATE FUNCTION syncd.trim_whitespace(value text)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN btrim(value, E' \u0009\u000a\u000b\u000c\u000d\u0085\u00a0\u1680\u2000\u2001\u2002'
    '\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000');

-- The canonical text of a raw identifier (before validation and hashing).
-- COLLATE "default" on the result: the collation of what the plan nets and compares stays
-- as before (the plan compares sent values under "C" explicitly).
CREATE OR REPLACE FUNCTION syncd.canonical_identifier(raw text, identifier_type text)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    -- pg_unicode_fast maps ASCII as cheaply as COLLATE "C" (no branch needed for it).
    WHEN identifier_type IN ('email', 'madid')
        THEN lower(syncd.trim_whitespace(raw) COLLATE pg_unicode_fast) COLLATE "default"
    WHEN identifier_type = 'phoneNumber' THEN
        CASE WHEN octet_length(syncd.trim_whitespace(raw)) = 64
                  AND syncd.trim_whitespace(raw) ~ '^[0-9a-fA-F]+$'
            THEN lower(syncd.trim_whitespace(raw) COLLATE "C") COLLATE "default"
            -- Separators out (whitespace, dots, dashes), then '(0)', then brackets; 00 is +.
            ELSE regexp_replace(
                translate(replace(regexp_replace(raw,
                    '[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000.-]',
                    '', 'g'), '(0)', ''), '()', ''),
                '^00', '+')
        END
    ELSE syncd.trim_whitespace(raw)
END;

-- Why a canonical identifier cannot be sent, or NULL when it can.
CREATE OR REPLACE FUNCTION syncd.identifier_problem(canon text, identifier_type text)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN canon IS NULL OR canon = '' THEN 'empty'
    WHEN syncd.identifier_is_hashed(canon, identifier_type) THEN NULL
    -- The hot path: an email address of printable ASCII only (no space, no control
    -- character), so at most 254 characters when at most 254 bytes. Anything else takes
    -- the checks below, in the order Python makes them. One regular expression costs as
    -- much as the four LIKE and strpos tests together (about 0.3 s per million; a single
    -- anchored expression for the whole address costs 0.55).
    WHEN identifier_type = 'email' AND octet_length(canon) <= 254
        AND canon LIKE '_%@_%._%' AND canon NOT LIKE '%@%@%' AND canon !~ '[^!-~]' THEN NULL
    WHEN canon ~ '[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]'
        THEN 'contains_whitespace'
    WHEN canon ~ '[\u0001-\u001f\u007f-\u009f]' THEN 'contains_control_character'
    WHEN canon ~ ('[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f'
                  '\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8'
                  '\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]')
        THEN 'contains_invisible_character'
    WHEN identifier_type = 'email' THEN
        CASE WHEN canon NOT LIKE '_%@_%._%' OR canon LIKE '%@%@%' THEN 'not_an_email'
             WHEN length(canon) > 254 THEN 'too_long'
        END
    WHEN identifier_type = 'phoneNumber' AND canon !~ '^\+[1-9][0-9]{6,14}$'
        THEN 'not_an_e164_phone_number'
    WHEN identifier_type = 'madid'
        AND canon !~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
        THEN 'not_a_mobile_ad_id'
    WHEN length(canon) > 256 THEN 'too_long'
END;
