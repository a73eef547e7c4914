"""Settings: parsed once from the environment; every bad value is named; secrets stay hidden."""

from __future__ import annotations

import pytest

from syncd.config import MAX_CHUNK_SIZE, Settings
from syncd.errors import ConfigError

BASE = {
    "SYNCD_DATABASE_URL": "postgresql://u:pw-in-url@localhost/crm",
    "CRITEO_CLIENT_ID": "id",
    "CRITEO_CLIENT_SECRET": "s3cr3t-value",
}


def test_defaults() -> None:
    s = Settings.from_env(BASE)
    assert s.criteo_api_url == "https://api.criteo.com"
    assert s.token_url == "https://api.criteo.com/oauth2/token"
    assert s.criteo_api_version == "2026-07"
    assert (s.concurrency, s.chunk_size, s.log_format, s.log_level) == (8, 50_000, "json", "info")


def test_secrets_never_in_repr() -> None:
    s = Settings.from_env(BASE)
    text = repr(s) + str(s)
    assert "s3cr3t-value" not in text
    assert "pw-in-url" not in text
    assert s.criteo_client_secret.reveal() == "s3cr3t-value"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SYNCD_CONCURRENCY", "abc", "SYNCD_CONCURRENCY: 'abc' is not a whole number"),
        ("SYNCD_CONCURRENCY", "0", "SYNCD_CONCURRENCY: 0 is out of range"),
        ("SYNCD_CHUNK_SIZE", str(MAX_CHUNK_SIZE + 1), "SYNCD_CHUNK_SIZE: 50001 is out of range"),
        ("CRITEO_API_URL", "ftp://x", "CRITEO_API_URL: 'ftp://x' is not an http(s) URL"),
        ("CRITEO_API_VERSION", "2026-13", "CRITEO_API_VERSION: '2026-13' is not a Criteo API"),
        ("SYNCD_LOG_FORMAT", "xml", "SYNCD_LOG_FORMAT: 'xml' is not one of json, console"),
        ("SYNCD_LOG_LEVEL", "loud", "SYNCD_LOG_LEVEL: 'loud' is not one of"),
        ("SYNCD_HTTP_TIMEOUT_S", "-1", "SYNCD_HTTP_TIMEOUT_S: -1 is out of range"),
        ("SYNCD_DATABASE_URL", "mysql://x", "SYNCD_DATABASE_URL: must be a postgresql:// URL"),
    ],
)
def test_malformed_values_are_named(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, name: value})
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("name", ["SYNCD_DATABASE_URL", "CRITEO_CLIENT_ID", "CRITEO_CLIENT_SECRET"])
def test_missing_required(name: str) -> None:
    env = {k: v for k, v in BASE.items() if k != name}
    with pytest.raises(ConfigError, match=f"^{name} is not set$"):
        Settings.from_env(env)


def test_credentials_optional_for_commands_that_do_not_call_criteo() -> None:
    s = Settings.from_env({"SYNCD_DATABASE_URL": BASE["SYNCD_DATABASE_URL"]}, need_criteo=False)
    assert not s.has_criteo_credentials


def test_lease_must_outlive_a_request() -> None:
    with pytest.raises(ConfigError, match="SYNCD_LEASE_S"):
        Settings.from_env({**BASE, "SYNCD_LEASE_S": "60", "SYNCD_HTTP_TIMEOUT_S": "60"})


def test_settings_are_frozen() -> None:
    s = Settings.from_env(BASE)
    with pytest.raises(AttributeError):
        s.concurrency = 3  # type: ignore[misc]
