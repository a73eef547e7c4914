"""The one settings object, parsed once from environment variables.

Every variable is documented in `.env.example`, in the same order as the fields
below. Parsing is eager: the first missing or malformed value raises
ConfigError naming the variable, before any work starts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from syncd.errors import ConfigError

T = TypeVar("T")

MAX_CHUNK_SIZE = 50_000  # Criteo's documented limit of identifiers per add/remove request
DEFAULT_API_VERSION = "2026-07"
# Criteo publishes two stable versions a year (January, July); older ones answer 410 Gone.
_API_VERSION = re.compile(r"^(preview|20[2-9][0-9]-(0[1-9]|1[0-2]))$")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("json", "console")
# ASCII digits only: int() and float() also take '1_0', full-width and other Unicode
# digits, 'nan' and 'inf', none of which an operator means in a setting.
_WHOLE = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?([0-9]+(\.[0-9]*)?|\.[0-9]+)")
# Criteo computes contact-list audiences at 00:00 and 12:00 UTC (about 5 h to go live).
DEFAULT_WINDOWS = (dt.time(0, 0), dt.time(12, 0))
# Probes (Kubernetes, Docker HEALTHCHECK) and Prometheus reach the process from outside
# its network namespace; SYNCD_HTTP_HOST=127.0.0.1 keeps the server local.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104
_HH_MM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
# Criteo app names (CRITEO_APPS): lower-case letters, digits and underscores.
_APP_NAME = re.compile(r"[a-z0-9_]+")
DEFAULT_APP = "default"  # the app of CRITEO_CLIENT_ID / CRITEO_CLIENT_SECRET
# Each app named in CRITEO_APPS reads these, <NAME> being its name upper-cased.
APP_CLIENT_ID = "CRITEO_APP_<NAME>_CLIENT_ID"
APP_CLIENT_SECRET = "CRITEO_APP_<NAME>_CLIENT_SECRET"  # noqa: S105 - a variable's name
APP_RATE_LIMIT = "CRITEO_APP_<NAME>_RATE_LIMIT_PER_MIN"
_ENCODE_HINT = "percent-encode reserved characters (/ ? # @ : %) in the user name and password"


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class CriteoApp:
    """One Criteo app: its credentials and its own ceiling on calls per minute (0: only
    SYNCD_RATE_LIMIT_PER_MIN and what Criteo says). Each has its own token and budget."""

    name: str
    client_id: str
    client_secret: Secret
    rate_limit_per_min: int = 0
    # The variables its credentials come from, for messages (never their values).
    source: str = "CRITEO_CLIENT_ID / CRITEO_CLIENT_SECRET"


@dataclass(frozen=True)
class Settings:
    database_url: Secret
    criteo_client_id: str
    criteo_client_secret: Secret
    criteo_api_url: str = "https://api.criteo.com"
    criteo_api_version: str = DEFAULT_API_VERSION
    concurrency: int = 8
    chunk_size: int = MAX_CHUNK_SIZE
    plan_concurrency: int = 2
    http_timeout_s: float = 60.0
    rate_limit_per_min: int = 0  # a ceiling of the user's own; 0: what Criteo says
    max_attempts: int = 5
    retry_base_s: float = 0.5
    retry_max_wait_s: float = 30.0
    lease_s: float = 300.0
    retention_days: int = 30
    log_level: str = "info"
    log_format: str = "json"
    # -- `syncd run` (the daemon) --
    windows_utc: tuple[dt.time, ...] = DEFAULT_WINDOWS
    lead_minutes: int = 60
    interval_minutes: int = 0  # 0: runs only ahead of windows
    shutdown_grace_s: float = 20.0  # below Kubernetes' default 30 s termination grace
    http_host: str = ALL_INTERFACES
    http_port: int = 8080  # 0: no HTTP server
    verify_after_hours: float = 5.0  # after each window: Criteo's ~5 h to compute; 0: off
    verify_tolerance: float = 0.02
    # A plan removing more than this share of a segment's acknowledged members is blocked
    # until `syncd approve`: a truncated source or a CRM bug must not empty a live list.
    max_remove_fraction: float = 0.5  # 1: no guard
    # `syncd resync` empties a list before re-adding it: never that close to a window.
    resync_min_hours: float = 6.0
    # -- more Criteo apps than the default one (CRITEO_APPS) --
    criteo_apps: tuple[CriteoApp, ...] = ()

    @property
    def token_url(self) -> str:
        return f"{self.criteo_api_url}/oauth2/token"

    @property
    def app_names(self) -> tuple[str, ...]:
        return (DEFAULT_APP, *(app.name for app in self.criteo_apps))

    def app(self, name: str = DEFAULT_APP) -> CriteoApp:
        """One Criteo app by name; ConfigError when no such app is configured."""
        if name == DEFAULT_APP:
            return CriteoApp(DEFAULT_APP, self.criteo_client_id, self.criteo_client_secret)
        for app in self.criteo_apps:
            if app.name == name:
                return app
        raise ConfigError(
            f"no Criteo app named {name!r}: the apps are {', '.join(self.app_names)} "
            "(name more in CRITEO_APPS)"
        )

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, need_criteo: bool = True
    ) -> Settings:
        """Read every variable; raise ConfigError for the first one that is wrong.

        Commands that never talk to Criteo (migrate, segments, status, plan) pass
        `need_criteo=False` and run without credentials.
        """
        e = os.environ if env is None else env
        client_id = _get(e, "CRITEO_CLIENT_ID", str, required=need_criteo, default="")
        client_secret = _get(e, "CRITEO_CLIENT_SECRET", str, required=need_criteo, default="")
        settings = cls(
            database_url=Secret(_get(e, "SYNCD_DATABASE_URL", _database_url, required=True)),
            criteo_client_id=client_id,
            criteo_client_secret=Secret(client_secret),
            criteo_api_url=_get(e, "CRITEO_API_URL", _http_url, default="https://api.criteo.com"),
            criteo_api_version=_get(e, "CRITEO_API_VERSION", _api_version, DEFAULT_API_VERSION),
            concurrency=_get(e, "SYNCD_CONCURRENCY", _int_in(1, 16), default=8),
            chunk_size=_get(e, "SYNCD_CHUNK_SIZE", _int_in(1, MAX_CHUNK_SIZE), MAX_CHUNK_SIZE),
            plan_concurrency=_get(e, "SYNCD_PLAN_CONCURRENCY", _int_in(1, 16), default=2),
            http_timeout_s=_get(e, "SYNCD_HTTP_TIMEOUT_S", _float_in(0.1, 600), default=60.0),
            rate_limit_per_min=_get(e, "SYNCD_RATE_LIMIT_PER_MIN", _int_in(0, 100_000), 0),
            max_attempts=_get(e, "SYNCD_MAX_ATTEMPTS", _int_in(1, 100), default=5),
            retry_base_s=_get(e, "SYNCD_RETRY_BASE_S", _float_in(0, 60), default=0.5),
            retry_max_wait_s=_get(e, "SYNCD_RETRY_MAX_WAIT_S", _float_in(0, 3600), default=30.0),
            lease_s=_get(e, "SYNCD_LEASE_S", _float_in(5, 86_400), default=300.0),
            retention_days=_get(e, "SYNCD_RETENTION_DAYS", _int_in(1, 3650), default=30),
            log_level=_get(e, "SYNCD_LOG_LEVEL", _choice(_LOG_LEVELS), default="info"),
            log_format=_get(e, "SYNCD_LOG_FORMAT", _choice(_LOG_FORMATS), default="json"),
            windows_utc=_get(e, "SYNCD_WINDOWS_UTC", _windows, default=DEFAULT_WINDOWS),
            lead_minutes=_get(e, "SYNCD_LEAD_MINUTES", _int_in(0, 720), default=60),
            interval_minutes=_get(e, "SYNCD_INTERVAL_MINUTES", _int_in(0, 1440), default=0),
            shutdown_grace_s=_get(e, "SYNCD_SHUTDOWN_GRACE_S", _float_in(0, 3600), default=20.0),
            http_host=_get(e, "SYNCD_HTTP_HOST", _host, default=ALL_INTERFACES),
            http_port=_get(e, "SYNCD_HTTP_PORT", _int_in(0, 65535), default=8080),
            verify_after_hours=_get(e, "SYNCD_VERIFY_AFTER_HOURS", _float_in(0, 23), default=5.0),
            verify_tolerance=_get(e, "SYNCD_VERIFY_TOLERANCE", _float_in(0, 1), default=0.02),
            max_remove_fraction=_get(e, "SYNCD_MAX_REMOVE_FRACTION", _float_in(0, 1), default=0.5),
            resync_min_hours=_get(e, "SYNCD_RESYNC_MIN_HOURS", _float_in(0, 12), default=6.0),
            criteo_apps=_apps(e),
        )
        if settings.lease_s < settings.http_timeout_s * 2:
            raise ConfigError(
                f"SYNCD_LEASE_S: {settings.lease_s:g} s is too short; it must be at least twice "
                f"SYNCD_HTTP_TIMEOUT_S ({settings.http_timeout_s:g} s) so a chunk's lease outlives "
                "one request"
            )
        return settings


def _get(
    env: Mapping[str, str],
    name: str,
    parse: Callable[[str], T],
    default: T | None = None,
    *,
    required: bool = False,
) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        if required:
            raise ConfigError(f"{name} is not set")
        assert default is not None
        return default
    try:
        return parse(raw.strip())
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        if not _WHOLE.fullmatch(raw):
            raise ValueError(f"{raw!r} is not a whole number (ASCII digits only)")
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range; use {low} to {high}")
        return value

    return parse


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        if not _DECIMAL.fullmatch(raw):
            raise ValueError(f"{raw!r} is not a number such as 0.5 (ASCII digits only)")
        value = float(raw)
        if not low <= value <= high:
            raise ValueError(f"{value:g} is out of range; use {low:g} to {high:g}")
        return value

    return parse


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.lower()
        if value not in options:
            raise ValueError(f"{raw!r} is not one of {', '.join(options)}")
        return value

    return parse


def _http_url(raw: str) -> str:
    # A URL with an '@' may carry credentials (or a password whose unencoded '/' or '#'
    # moved the rest into the path): it is refused without being echoed.
    if "@" in raw:
        raise ValueError(
            "must not hold a user name or password; the credentials go in "
            "CRITEO_CLIENT_ID and CRITEO_CLIENT_SECRET"
        )
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{raw!r} is not an http(s) URL such as https://api.criteo.com")
    _check_port(parts.netloc.rpartition("]")[2].rpartition(":"))
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(
            "plain http is only for a sandbox on loopback (127.0.0.1, ::1, localhost); "
            "use https for any other host"
        )
    return raw.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host_port: tuple[str, str, str]) -> None:
    """`host_port` is `host.rpartition(":")`; the port, when given, must be 1-65535."""
    _, colon, port = host_port
    if colon and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError("the port is not a number from 1 to 65535")


def _database_url(raw: str) -> str:
    # Never echo the URL, nor any part of it: it usually holds a password, and a password
    # with an unencoded '/', '?' or '#' spills into the port, the path or the query.
    parts = urlsplit(raw)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("must be a postgresql:// URL")
    # The netloc ends at the first '/', '?' or '#': an '@' after it is a password's.
    if "@" in raw.partition("//")[2][len(parts.netloc) :]:
        raise ValueError(f"the URL is malformed: {_ENCODE_HINT}")
    hosts = parts.netloc.rpartition("@")[2]
    try:
        ports = parse_qs(parts.query).get("port", [])
        for host in hosts.split(","):
            _check_port(host.rpartition("]")[2].rpartition(":"))
        for port in ports:
            for one in port.split(","):
                _check_port(("", ":", one))
    except ValueError as exc:
        raise ValueError(f"{exc}; if it is right, {_ENCODE_HINT}") from None
    return raw


def _api_version(raw: str) -> str:
    if not _API_VERSION.match(raw):
        raise ValueError(f"{raw!r} is not a Criteo API version such as {DEFAULT_API_VERSION}")
    return raw


def _windows(raw: str) -> tuple[dt.time, ...]:
    times: set[dt.time] = set()
    for part in raw.split(","):
        match = _HH_MM.fullmatch(part.strip())
        if not match:
            raise ValueError(f"{part.strip()!r} is not a UTC time HH:MM such as 00:00 or 12:00")
        times.add(dt.time(int(match[1]), int(match[2])))
    return tuple(sorted(times))


def _host(raw: str) -> str:
    # An address to listen on: an IP address or a plain host name, nothing else.
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", raw):
            return raw
        raise ValueError(f"{raw!r} is not an IP address or host name to listen on") from None


def _apps(env: Mapping[str, str]) -> tuple[CriteoApp, ...]:
    """The apps CRITEO_APPS names, each with its credentials (required, whatever the
    command: an app named without them is a mistake to report at once)."""
    names = [n.strip() for n in env.get("CRITEO_APPS", "").split(",") if n.strip()]
    apps: list[CriteoApp] = []
    for name in names:
        if not _APP_NAME.fullmatch(name):
            raise ConfigError(
                f"CRITEO_APPS: {name!r} is not an app name (lower-case letters, digits and "
                "underscores, such as brand_b)"
            )
        if name == DEFAULT_APP or name in (app.name for app in apps):
            why = "is the app of CRITEO_CLIENT_ID" if name == DEFAULT_APP else "is named twice"
            raise ConfigError(f"CRITEO_APPS: {name!r} {why}")
        id_var, secret_var, limit_var = (
            v.replace("<NAME>", name.upper())
            for v in (APP_CLIENT_ID, APP_CLIENT_SECRET, APP_RATE_LIMIT)
        )
        apps.append(
            CriteoApp(
                name=name,
                client_id=_get(env, id_var, str, required=True),
                client_secret=Secret(_get(env, secret_var, str, required=True)),
                rate_limit_per_min=_get(env, limit_var, _int_in(0, 100_000), default=0),
                source=f"{id_var} / {secret_var}",
            )
        )
    return tuple(apps)
