"""Every Prometheus metric syncd exposes, defined once, on one registry.

The names here are a contract: the alert rules and the Grafana dashboard in
`deploy/monitoring/` use them, and a test checks that they use no other. Labels
carry only names an operator chose (app, segment key, outcome), never an
identifier, a secret or a URL.

Counters only grow inside one process; Prometheus' `rate()` and `increase()`
handle the reset when the process restarts. The gauges that describe the
database (pending and failed chunks) are refreshed from it at scrape time by
the HTTP server, so every replica reports the same figures.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from syncd.errors import RetryableError

REGISTRY = CollectorRegistry(auto_describe=True)
# process_resident_memory_bytes and friends: the flat-memory promise, watched.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# -- pushing (push.py, criteo/client.py) ---------------------------------------------
CHUNKS_PUSHED = Counter(
    "syncd_chunks_pushed",
    "Chunks that left the pusher, by app and PushOutcome (acknowledged, failed, deferred, ...).",
    ["app", "outcome"],
    registry=REGISTRY,
)
IDENTIFIERS_SENT = Counter(
    "syncd_identifiers_sent",
    "Identifiers in acknowledged requests, by segment key and operation (a clear adds 0).",
    ["segment", "operation"],
    registry=REGISTRY,
)
IDENTIFIERS_VALID = Counter(
    "syncd_identifiers_valid",
    "Identifiers Criteo counted valid (nbValidIdentifiers), by segment key.",
    ["segment"],
    registry=REGISTRY,
)
IDENTIFIERS_INVALID = Counter(
    "syncd_identifiers_invalid",
    "Identifiers Criteo counted invalid (nbInvalidIdentifiers), by segment key.",
    ["segment"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "syncd_request_duration_seconds",
    "Time of one HTTP request to Criteo, answer or fault, by app.",
    ["app"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
REQUEST_RETRIES = Counter(
    "syncd_request_retries",
    "Requests sent again after a fault (server_error, timeout, connection), by app and reason.",
    ["app", "reason"],
    registry=REGISTRY,
)
RATE_LIMITED = Counter(
    "syncd_rate_limited",
    "429 answers from Criteo, by app. They never count as a chunk's attempt.",
    ["app"],
    registry=REGISTRY,
)
API_SUNSET = Gauge(
    "syncd_api_sunset_timestamp_seconds",
    "Sunset date Criteo announced for the configured API version (Unix time), once announced.",
    ["version"],
    registry=REGISTRY,
)

# -- call budget (criteo/pacing.py) ---------------------------------------------------
BUDGET_LIMIT = Gauge(
    "syncd_budget_limit_per_minute",
    "Calls per minute the app may make: what Criteo's x-ratelimit-limit says, capped by settings.",
    ["app"],
    registry=REGISTRY,
)
BUDGET_CALLS = Counter(
    "syncd_budget_calls",
    "Calls this process reserved from the app's shared budget.",
    ["app"],
    registry=REGISTRY,
)

# -- the database's view (refreshed at scrape time) ----------------------------------
CHUNKS_PENDING = Gauge(
    "syncd_chunks_pending",
    "Chunks planned and not yet acknowledged (pending or claimed), all replicas.",
    registry=REGISTRY,
)
CHUNKS_FAILED = Gauge(
    "syncd_chunks_failed",
    "Chunks that used up their attempts and wait for a fix (the next run retries them).",
    registry=REGISTRY,
)
SEGMENTS_BLOCKED = Gauge(
    "syncd_segments_blocked",
    "Segments whose plan the mass-removal guard blocked: nothing of it is sent until "
    "`syncd approve KEY` or a fixed source.",
    registry=REGISTRY,
)

# -- runs and windows (daemon) --------------------------------------------------------
RUNS = Counter(
    "syncd_runs",
    "Runs this process finished, by outcome (ok, failed).",
    ["outcome"],
    registry=REGISTRY,
)
LAST_SUCCESS = Gauge(
    "syncd_last_success_timestamp_seconds",
    "When the last run that left nothing failing ended (Unix time).",
    registry=REGISTRY,
)
NEXT_WINDOW_SECONDS = Gauge(
    "syncd_next_window_seconds",
    "Seconds until Criteo's next audience computation window (00:00 and 12:00 UTC by default).",
    registry=REGISTRY,
)
WINDOWS_MISSED = Counter(
    "syncd_windows_missed",
    "Windows whose run ended late or left chunks unacknowledged at the window.",
    registry=REGISTRY,
)
READY = Gauge(
    "syncd_ready",
    "1 when the database is reachable and migrations are current, else 0.",
    registry=REGISTRY,
)


# -- what pushing counts (push.py) ---------------------------------------------------

RetryReason = Literal["server_error", "timeout", "connection", "other"]


def retry_reason(error: RetryableError) -> RetryReason:
    """The `reason` label of a fault retry: a few fixed words, never Criteo's text."""
    if error.status is None and error.code in ("timeout", "connection"):
        return "timeout" if error.code == "timeout" else "connection"  # no answer at all
    if error.status == 408:
        return "timeout"
    if error.status is not None and error.status >= 500:
        return "server_error"
    return "other"  # an unreadable token answer, say


def count_retry(app: str, error: RetryableError) -> None:
    REQUEST_RETRIES.labels(app, retry_reason(error)).inc()


def count_acknowledged(
    segment_key: str, operation: str, identifiers: int, valid: int | None, invalid: int | None
) -> None:
    """Identifiers sent and Criteo's counts, by segment KEY (never an identifier)."""
    IDENTIFIERS_SENT.labels(segment_key, operation).inc(identifiers)
    IDENTIFIERS_VALID.labels(segment_key).inc(valid or 0)
    IDENTIFIERS_INVALID.labels(segment_key).inc(invalid or 0)
