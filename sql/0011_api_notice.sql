-- What Criteo said of the configured API version during each run: a version is deprecated
-- for its last months (every answer carries `Deprecation: true` and a `Sunset` date), then
-- retired (410 Gone). The run records the version it used, whether Criteo called it
-- deprecated, and the sunset date, so that `syncd status` can say how many days are left.
ALTER TABLE syncd.sync_runs
    ADD COLUMN api_version    text,
    ADD COLUMN api_deprecated boolean NOT NULL DEFAULT false,
    ADD COLUMN api_sunset     timestamptz;
