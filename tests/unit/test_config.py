"""Settings: parsed once from the environment; every bad value is named; secrets stay hidden."""

from __future__ import annotations

import datetime as dt
import re

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
    assert (s.criteo_client_id, s.criteo_client_secret.reveal()) == ("", "")


def test_lease_must_outlive_a_request() -> None:
    with pytest.raises(ConfigError, match="SYNCD_LEASE_S"):
        Settings.from_env({**BASE, "SYNCD_LEASE_S": "60", "SYNCD_HTTP_TIMEOUT_S": "60"})


def test_settings_are_frozen() -> None:
    s = Settings.from_env(BASE)
    with pytest.raises(AttributeError):
        s.concurrency = 3  # type: ignore[misc]


# --- numbers: ASCII digits only ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SYNCD_CONCURRENCY", "1_0"),
        ("SYNCD_CONCURRENCY", "\uff11\uff10"),  # full-width "10"
        ("SYNCD_CONCURRENCY", "\u0661"),  # Arabic-Indic "1"
        ("SYNCD_CONCURRENCY", "+4"),
        ("SYNCD_HTTP_TIMEOUT_S", "1_0"),
        ("SYNCD_HTTP_TIMEOUT_S", "\uff11\uff10"),
        ("SYNCD_HTTP_TIMEOUT_S", "nan"),
        ("SYNCD_HTTP_TIMEOUT_S", "NaN"),
        ("SYNCD_RETRY_MAX_WAIT_S", "inf"),
        ("SYNCD_RETRY_MAX_WAIT_S", "Infinity"),
        ("SYNCD_RETRY_BASE_S", "1e-1"),
    ],
)
def test_numbers_are_plain_ascii_digits(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}: .* is not a"):
        Settings.from_env({**BASE, name: value})


def test_plain_decimals_are_accepted() -> None:
    s = Settings.from_env(
        {
            **BASE,
            "SYNCD_HTTP_TIMEOUT_S": "12.5",
            "SYNCD_RETRY_BASE_S": "0",
            "SYNCD_CONCURRENCY": "3",
        }
    )
    assert (s.http_timeout_s, s.retry_base_s, s.concurrency) == (12.5, 0.0, 3)


# --- SYNCD_DATABASE_URL: malformed is configuration, and never shows the password --------------


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("postgresql://u:pw@localhost:99999/crm", "port"),
        ("postgresql://u:pw@localhost:0/crm", "port"),
        ("postgresql://u:pw@localhost:54x/crm", "port"),
        ("postgresql://u:pw@h1:5432,h2:70000/crm", "port"),
        ("postgresql://u:pw@localhost/crm?port=99999", "port"),
        # reserved characters in the password, not percent-encoded
        ("postgresql://u:se/cr3tpw@localhost:5432/crm", "percent-encode"),
        ("postgresql://u:/se-cr3tpw@localhost:5432/crm", "percent-encode"),
        # digits before the '/': a valid port for host 'u', the rest a path with an '@'
        ("postgresql://u:5432/cr3tpw@localhost:5432/crm", "percent-encode"),
        ("postgresql://u:se?cr3tpw@localhost:5432/crm", "percent-encode"),
        ("postgresql://u:se#cr3tpw@localhost:5432/crm", "percent-encode"),
    ],
)
def test_malformed_database_url_is_named_without_its_password(url: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "SYNCD_DATABASE_URL": url})
    message = str(caught.value)
    assert message.startswith("SYNCD_DATABASE_URL: "), message
    assert needle in message, message
    for secret in ("pw", "cr3t", "se/", "se?", "se#", "/se"):
        assert secret not in message, message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@localhost:5432/crm",
        "postgres://u:p%2Fw@db.internal/crm?sslmode=require",
        "postgresql://u:pw@h1:5432,h2:5433/crm",
        "postgresql://u:pw@[::1]:5432/crm",
        "postgresql:///crm?host=/var/run/postgresql",
        "postgresql://u:p@ss@localhost/crm",  # '@' in a password: the last '@' ends it
    ],
)
def test_well_formed_database_urls_are_accepted(url: str) -> None:
    assert Settings.from_env({**BASE, "SYNCD_DATABASE_URL": url}).database_url.reveal() == url


# --- CRITEO_API_URL ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8181",
        "http://127.8.9.10:8181",
        "http://localhost:8181",
        "http://LOCALHOST",
        "http://[::1]:8181",
        "https://api.criteo.com",
        "https://api.criteo.com:8443/",
    ],
)
def test_api_url_plain_http_only_on_loopback(url: str) -> None:
    assert Settings.from_env({**BASE, "CRITEO_API_URL": url}).criteo_api_url == url.rstrip("/")


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://api.criteo.com", "https"),
        ("http://10.0.0.5:8181", "https"),
        ("http://localhost.example.com", "https"),
        ("http://128.0.0.1", "https"),
        ("https://api.criteo.com:99999", "port"),
        ("https://api.criteo.com:0", "port"),
        ("https://api.criteo.com:http", "port"),
        ("https://", "http(s) URL"),
    ],
)
def test_api_url_refusals_name_the_variable(url: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "CRITEO_API_URL": url})
    assert str(caught.value).startswith("CRITEO_API_URL: "), caught.value
    assert needle in str(caught.value), caught.value


@pytest.mark.parametrize(
    "url",
    [
        "https://me:hunter2pw@api.criteo.com",
        "https://me@api.criteo.com",
        "http://me:hunter2pw@127.0.0.1:8181",
        "https://me:hun/ter2pw@api.criteo.com",  # unencoded '/': the port would be 'hun'
        "https://me:hun#ter2pw@api.criteo.com",
        "ftp://me:hunter2pw@api.criteo.com",
        "https://api.criteo.com/x@hunter2pw",
    ],
)
def test_api_url_with_credentials_is_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "CRITEO_API_URL": url})
    message = str(caught.value)
    assert message.startswith("CRITEO_API_URL: "), message
    for secret in ("hunter2pw", "hun", "ter2pw", "me:", "me@"):
        assert secret not in message, message


def test_daemon_defaults_are_criteos_windows_an_hour_ahead() -> None:
    s = Settings.from_env(BASE)
    assert s.windows_utc == (dt.time(0, 0), dt.time(12, 0))
    assert (s.lead_minutes, s.interval_minutes, s.shutdown_grace_s) == (60, 0, 20.0)
    assert (s.http_host, s.http_port) == ("0.0.0.0", 8080)


def test_windows_are_sorted_and_deduplicated() -> None:
    s = Settings.from_env({**BASE, "SYNCD_WINDOWS_UTC": " 12:00, 06:30,12:00"})
    assert s.windows_utc == (dt.time(6, 30), dt.time(12, 0))


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SYNCD_WINDOWS_UTC", "24:00", "SYNCD_WINDOWS_UTC: '24:00' is not a UTC time HH:MM"),
        ("SYNCD_WINDOWS_UTC", "00:00,noon", "SYNCD_WINDOWS_UTC: 'noon' is not a UTC time HH:MM"),
        ("SYNCD_WINDOWS_UTC", "0:00", "SYNCD_WINDOWS_UTC: '0:00' is not a UTC time HH:MM"),
        ("SYNCD_LEAD_MINUTES", "721", "SYNCD_LEAD_MINUTES: 721 is out of range"),
        ("SYNCD_HTTP_PORT", "70000", "SYNCD_HTTP_PORT: 70000 is out of range"),
        ("SYNCD_HTTP_HOST", "a b", "SYNCD_HTTP_HOST: 'a b' is not an IP address or host name"),
        ("SYNCD_VERIFY_AFTER_HOURS", "24", "SYNCD_VERIFY_AFTER_HOURS: 24 is out of range"),
        ("SYNCD_VERIFY_TOLERANCE", "1.5", "SYNCD_VERIFY_TOLERANCE: 1.5 is out of range"),
        ("SYNCD_MAX_REMOVE_FRACTION", "2", "SYNCD_MAX_REMOVE_FRACTION: 2 is out of range"),
        ("SYNCD_MAX_REMOVE_FRACTION", "half", "SYNCD_MAX_REMOVE_FRACTION: 'half'"),
        ("SYNCD_RESYNC_MIN_HOURS", "13", "SYNCD_RESYNC_MIN_HOURS: 13 is out of range"),
    ],
)
def test_daemon_settings_refusals_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env({**BASE, name: value})


# --- several Criteo apps ---------------------------------------------------------------------

APPS = {
    **BASE,
    "CRITEO_APPS": " brand_b, retailer_x ",
    "CRITEO_APP_BRAND_B_CLIENT_ID": "b-id",
    "CRITEO_APP_BRAND_B_CLIENT_SECRET": "b-secret-value",
    "CRITEO_APP_RETAILER_X_CLIENT_ID": "x-id",
    "CRITEO_APP_RETAILER_X_CLIENT_SECRET": "x-secret-value",
    "CRITEO_APP_RETAILER_X_RATE_LIMIT_PER_MIN": "100",
}


def test_apps_are_named_in_criteo_apps_with_their_own_credentials() -> None:
    s = Settings.from_env(APPS)
    assert s.app_names == ("default", "brand_b", "retailer_x")
    default, brand_b, retailer_x = (s.app(name) for name in s.app_names)
    assert (default.client_id, default.client_secret.reveal()) == ("id", "s3cr3t-value")
    assert (brand_b.client_id, brand_b.client_secret.reveal()) == ("b-id", "b-secret-value")
    assert (brand_b.rate_limit_per_min, retailer_x.rate_limit_per_min) == (0, 100)
    for secret in ("s3cr3t-value", "b-secret-value", "x-secret-value"):
        assert secret not in repr(s) and secret not in str(s.criteo_apps)
    assert Settings.from_env(BASE).app_names == ("default",)


def test_an_unknown_app_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="no Criteo app named 'brand_c'"):
        Settings.from_env(APPS).app("brand_c")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"CRITEO_APPS": "Brand-B"}, "CRITEO_APPS: 'Brand-B' is not an app name"),
        ({"CRITEO_APPS": "brand_b,brand_b"}, "CRITEO_APPS: 'brand_b' is named twice"),
        ({"CRITEO_APPS": "default"}, "CRITEO_APPS: 'default' is the app of CRITEO_CLIENT_ID"),
        ({"CRITEO_APP_BRAND_B_CLIENT_ID": ""}, "CRITEO_APP_BRAND_B_CLIENT_ID is not set"),
        (
            {"CRITEO_APP_RETAILER_X_CLIENT_SECRET": " "},
            "CRITEO_APP_RETAILER_X_CLIENT_SECRET is not set",
        ),
        (
            {"CRITEO_APP_RETAILER_X_RATE_LIMIT_PER_MIN": "lots"},
            "CRITEO_APP_RETAILER_X_RATE_LIMIT_PER_MIN: 'lots' is not a whole number",
        ),
    ],
)
def test_bad_app_configuration_names_the_variable(change: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        Settings.from_env({**APPS, **change})
    assert "secret-value" not in str(caught.value)
