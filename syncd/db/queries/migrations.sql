-- The ledger of applied migrations (the migrations themselves are sql/NNNN_*.sql).
-- Named blocks (`-- name: x`, then what it does); parameters are asyncpg's $1, $2, ...

-- name: create_migrations_table
-- The ledger of applied migrations (created before the first migration runs).
CREATE SCHEMA IF NOT EXISTS syncd;
CREATE TABLE IF NOT EXISTS syncd.schema_migrations (
    version    text PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
-- The migrations already applied, with their checksums.
SELECT version, name, checksum FROM syncd.schema_migrations ORDER BY version;

-- name: record_migration
-- Record one applied migration.
INSERT INTO syncd.schema_migrations (version, name, checksum) VALUES ($1, $2, $3);
