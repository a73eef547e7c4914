"""The Criteo client: one aiohttp session, the OAuth token, and one classified call.

One request per call, classified: an answer, a RetryableError (timeouts, dropped
connections, 408, 429, 5xx) or a PermanentError (other 4xx). Retrying is the
caller's business (push.py), so the policy lives in one place. A 401 is the one
exception: the token is fetched again and the request re-sent once, here. What is
sent where (amendments, and segment management next) lives beside this module.

Answers are read defensively: at most MAX_ANSWER_BYTES, strict UTF-8, JSON without
NaN or infinities, strings PostgreSQL can store. Whatever a proxy or a broken answer
sends becomes "unreadable" (None), never an exception that ends a run.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from syncd import __version__
from syncd.config import Settings
from syncd.criteo.pacing import Cooldown, Pacer, SharedBudget
from syncd.daemon.metrics import API_SUNSET, RATE_LIMITED, REQUEST_SECONDS
from syncd.errors import (
    CriteoError,
    PayloadTooLarge,
    PermanentError,
    RetryableError,
    RunAbortingError,
)
from syncd.logging import get_logger

log = get_logger(__name__)

TOKEN_REFRESH_MARGIN_S = 60.0  # fetch a new token this long before the old one expires
# Criteo's tokens live 15 minutes; an `expires_in` that is not a sane number gets this.
DEFAULT_TOKEN_LIFETIME_S = 900.0
MAX_TOKEN_LIFETIME_S = 86_400.0
# Criteo's answers are a few kilobytes: anything longer is not one of them (a proxy's
# page, a runaway body) and is not read further.
MAX_ANSWER_BYTES = 1 << 20
# No rate limit asks for more than an hour: a longer Retry-After or x-ratelimit-reset is
# a wrong header (milliseconds, a date far off), and waits this long at most.
RETRY_AFTER_CAP_S = 3600.0
_MAX_JSON_DEPTH = 32  # deeper JSON is cut (None): nothing syncd reads is nested that deep
_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

# Run right before each sending of a request (the re-send after a 401 too); it may
# raise to stop the sending (push.py renews the chunk's lease there).
BeforeSend = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Answer:
    """A 2xx answer: its status, its JSON body (None when empty or unreadable), its headers."""

    status: int
    payload: Any
    headers: Mapping[str, str]


class CriteoClient:
    """One aiohttp session for the whole process; tokens cached and shared."""

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.monotonic,
        app: str = "default",
        shared: SharedBudget | None = None,
    ) -> None:
        self.app = app  # the Criteo app's name: its budget, cool-down and metrics' label
        self._app = settings.app(app)  # its credentials and ceiling
        self._settings = settings
        self._session = session
        self._clock = clock
        self._token: str | None = None
        self._token_expires_at = 0.0
        self._token_lock = asyncio.Lock()
        # What Criteo said of the API version: Deprecation (and the Sunset date) seen in
        # the current run, warned about once per run (new_run() starts the next one).
        self.deprecated = False
        self.sunset: float | None = None
        self._deprecation_warned = False
        # The app's own ceiling, else the one every app shares; 0: what Criteo says.
        ceiling = self._app.rate_limit_per_min or settings.rate_limit_per_min
        self.pacer = Pacer(ceiling, clock, app=app, shared=shared)
        self.cooldown = Cooldown(clock)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, settings: Settings, app: str = "default", shared: SharedBudget | None = None
    ) -> AsyncIterator[CriteoClient]:
        # limit_per_host matches the application's own semaphore: a request never waits
        # inside the connector, where the wait would count against the connect timeout.
        connector = aiohttp.TCPConnector(
            limit=settings.concurrency + 2, limit_per_host=settings.concurrency
        )
        timeout = aiohttp.ClientTimeout(
            total=settings.http_timeout_s,
            sock_connect=min(10.0, settings.http_timeout_s),
            sock_read=settings.http_timeout_s,
        )
        headers = {"User-Agent": f"syncd/{__version__}"}
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=headers, raise_for_status=False
        ) as session:
            yield cls(settings, session, app=app, shared=shared)

    # --- token --------------------------------------------------------------------------

    async def token(self, *, stale: str | None = None) -> str:
        """The current token, fetched when there is none or it is about to expire.

        `stale` is a token Criteo just refused: it is fetched again only if that token is
        still the current one, so N requests refused together cause one fetch, not N.
        """
        async with self._token_lock:
            if (
                self._token is None
                or self._token == stale
                or self._clock() >= self._token_expires_at
            ):
                await self._fetch_token()
            assert self._token is not None
            return self._token

    async def _fetch_token(self) -> None:
        s = self._settings
        form = {
            "grant_type": "client_credentials",
            "client_id": self._app.client_id,
            "client_secret": self._app.client_secret.reveal(),
        }
        try:
            with REQUEST_SECONDS.labels(self.app).time():
                async with self._session.post(s.token_url, data=form) as resp:
                    status = resp.status
                    retry_after = retry_after_s(resp.headers)
                    body = await read_json(resp)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise RetryableError(
                f"token request failed: {type(exc).__name__}", code=_exc_code(exc)
            ) from None
        if status in _RETRYABLE_STATUSES:
            raise RetryableError(
                f"token request answered {status}", status=status, retry_after_s=retry_after
            )
        if status == 404:
            raise RunAbortingError(
                "Criteo's token endpoint was not found (HTTP 404 at CRITEO_API_URL + "
                "/oauth2/token): check CRITEO_API_URL (it is https://api.criteo.com for Criteo)",
                status=status,
                code="token-url-not-found",
            )
        token = body.get("access_token") if isinstance(body, dict) else None
        if status == 200 and not _usable_token(token):
            # Not Criteo's answer (a proxy, a captive portal) or a broken one: may pass.
            raise RetryableError(
                "the token answer could not be read (is CRITEO_API_URL Criteo's API?)",
                status=status,
                code="unreadable",
            )
        if status != 200 or not isinstance(token, str):
            code = body.get("error") if isinstance(body, dict) else None
            code = str(code)[:100] if code else None
            raise RunAbortingError(
                f"Criteo refused the credentials in {self._app.source} "
                f"(HTTP {status}{', ' + code if code else ''})",
                status=status,
                code=code or "token-refused",
            )
        lifetime = _token_lifetime_s(body.get("expires_in") if isinstance(body, dict) else None)
        self._token = token
        self._token_expires_at = self._clock() + max(1.0, lifetime - TOKEN_REFRESH_MARGIN_S)
        log.info("criteo_token_fetched", expires_in_s=lifetime)

    # --- calls --------------------------------------------------------------------------

    def url(self, path: str) -> str:
        """The URL of a versioned API path such as ``retail-media/audience-segments/...``."""
        s = self._settings
        return f"{s.criteo_api_url}/{s.criteo_api_version}/{path}"

    async def call(
        self,
        method: str,
        path: str,
        body: Callable[[], AsyncIterator[bytes]],
        size: int,
        *,
        idempotency_key: str | None = None,
        before_send: BeforeSend | None = None,
    ) -> Answer:
        """One authorised JSON call, classified: a 2xx Answer, or RetryableError,
        PermanentError, PayloadTooLarge, RunAbortingError. After a 401 the token is
        fetched again and the call re-sent once. `body()` yields the request body afresh
        for each sending; its `size` bytes are sent with a Content-Length.
        `before_send` runs right before each sending, after any wait for a token."""
        token = await self.token()
        for attempt in (1, 2):
            if before_send is not None:
                await before_send()
            answer = await self._send(method, path, body, size, token, idempotency_key)
            if answer is not None:
                return answer
            if attempt == 1:
                token = await self.token(stale=token)
        raise RunAbortingError(
            "Criteo answered 401 to a freshly fetched token: the app lacks access "
            "(check the 'Audiences Manage' permission)",
            status=401,
            code="authorization",
        )

    async def _send(
        self,
        method: str,
        path: str,
        body: Callable[[], AsyncIterator[bytes]],
        size: int,
        token: str,
        idempotency_key: str | None,
    ) -> Answer | None:
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            # Streamed with its size known: a plain request, not a chunked one.
            "Content-Length": str(size),
        }
        if idempotency_key is not None:
            # The same key on every attempt of a chunk: a retry is recognisable as one.
            headers["Idempotency-Key"] = idempotency_key
        try:
            # Timed answer or fault: a slow failure is latency an operator must see.
            with REQUEST_SECONDS.labels(self.app).time():
                async with self._session.request(
                    method, self.url(path), data=body(), headers=headers
                ) as resp:
                    status = resp.status
                    resp_headers = resp.headers
                    payload = await read_json(resp)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise RetryableError(
                f"request failed: {type(exc).__name__}", code=_exc_code(exc)
            ) from None
        self._check_deprecation(resp_headers)
        # Every answer (a 429 too) says where the app's budget stands.
        await self.pacer.learn(resp_headers, status)
        if status == 429:
            RATE_LIMITED.labels(app=self.app).inc()
            log.warning(
                "rate_limited",
                app=self.app,
                retry_after_s=retry_after_s(resp_headers),
                limit=resp_headers.get("x-ratelimit-limit"),
                reset=resp_headers.get("x-ratelimit-reset"),
            )
        if status == 401:
            return None
        if 200 <= status < 300:
            return Answer(status, payload, resp_headers)
        raise self._refusal(status, payload, resp_headers)

    def _refusal(self, status: int, payload: Any, headers: Any) -> CriteoError:
        """A non-2xx answer (401 aside) as the error class the caller branches on."""
        code, detail = error_code(payload)
        message = (
            f"HTTP {status}{': ' + code if code else ''}{' (' + detail + ')' if detail else ''}"
        )
        if status in _RETRYABLE_STATUSES:
            return RetryableError(
                message, status=status, code=code, retry_after_s=retry_after_s(headers)
            )
        if status == 410:
            return RunAbortingError(
                f"Criteo API version {self._settings.criteo_api_version} is retired (410 Gone); "
                "set CRITEO_API_VERSION to a supported version",
                status=status,
                code=code or "gone",
            )
        if status == 413 or (status == 400 and code and _is_size_code(code)):
            return PayloadTooLarge(message, status=status, code=code, body=payload)
        return PermanentError(message, status=status, code=code, body=payload)

    def new_run(self) -> None:
        """A run starts: what Criteo says of the version is noted, and warned, afresh."""
        self.deprecated, self.sunset, self._deprecation_warned = False, None, False

    def _check_deprecation(self, headers: Any) -> None:
        sunset = _http_date(headers.get("Sunset") or "")
        if sunset is not None:  # on every answer: the gauge follows what Criteo says now
            API_SUNSET.labels(self._settings.criteo_api_version).set(sunset)
            self.sunset = sunset
        if "Deprecation" not in headers:
            return
        self.deprecated = True
        if self._deprecation_warned:
            return
        self._deprecation_warned = True
        when = None if sunset is None else datetime.fromtimestamp(sunset, UTC).isoformat()
        log.warning(
            "criteo_api_version_deprecated",
            api_version=self._settings.criteo_api_version,
            sunset=when,
            hint="set CRITEO_API_VERSION to a newer stable version before the sunset date",
        )


def error_code(payload: Any) -> tuple[str | None, str | None]:
    """The first error's code and detail, from `errors` or, failing that, `warnings`."""
    if not isinstance(payload, dict):
        return None, None
    for key in ("errors", "warnings"):
        items = payload.get(key)
        if isinstance(items, list) and items and isinstance(items[0], dict):
            first = items[0]
            code = first.get("code")
            detail = first.get("detail") or first.get("title")
            return (str(code)[:100] if code else None), (str(detail)[:500] if detail else None)
    if payload.get("error"):
        return str(payload["error"])[:100], None
    return None, None


def retry_after_s(headers: Any, now: Callable[[], float] = time.time) -> float | None:
    """How long the API asked us to wait: Retry-After (seconds or HTTP-date), else the
    documented x-ratelimit-reset (epoch seconds), else None. Never negative, never
    more than RETRY_AFTER_CAP_S; None as well for a value that is not a time (NaN)."""
    raw = headers.get("Retry-After")
    if raw:
        wait = _seconds(raw)
        if wait is None:
            when = _http_date(raw)
            wait = None if when is None else when - now()
        if wait is not None:
            return min(RETRY_AFTER_CAP_S, max(0.0, wait))
    reset = headers.get("x-ratelimit-reset")
    if reset:
        at = _seconds(reset)
        if at is not None:
            return min(RETRY_AFTER_CAP_S, max(0.0, at - now()))
    return None


def _seconds(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def _http_date(raw: str) -> float | None:
    """An HTTP-date as epoch seconds, or None when it is not one."""
    try:
        when = parsedate_to_datetime(raw)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


async def read_json(resp: aiohttp.ClientResponse) -> Any:
    """An answer's JSON, or None when it is empty or cannot be read: longer than
    MAX_ANSWER_BYTES (not read further), not UTF-8, not JSON."""
    pieces: list[bytes] = []
    size = 0
    while piece := await resp.content.read(MAX_ANSWER_BYTES + 1 - size):
        pieces.append(piece)
        size += len(piece)
        if size > MAX_ANSWER_BYTES:
            return None
    return parse_json(b"".join(pieces))


def parse_json(raw: bytes) -> Any:
    """JSON as syncd can keep it: NaN and infinities read as null, strings without NUL or
    lone surrogates (PostgreSQL refuses both), nesting cut at a sane depth; None when
    `raw` is not UTF-8 JSON at all."""
    try:
        value = json.loads(
            raw.decode("utf-8"), parse_constant=lambda _: None, parse_float=_finite_float
        )
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return _storable(value, 0)


def _finite_float(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def _storable(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return _storable_text(value)
    if isinstance(value, list | dict) and depth >= _MAX_JSON_DEPTH:
        return None
    if isinstance(value, list):
        return [_storable(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {_storable_text(k): _storable(v, depth + 1) for k, v in value.items()}
    return value


def _storable_text(text: str) -> str:
    """Text PostgreSQL accepts: no NUL, no lone surrogate (each becomes '?')."""
    if text.isascii() and "\x00" not in text:
        return text
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def _usable_token(token: Any) -> bool:
    # It goes into a header: printable ASCII without spaces, of a sane length.
    return (
        isinstance(token, str)
        and 0 < len(token) <= 8192
        and token.isascii()
        and token.isprintable()
        and " " not in token
    )


def _token_lifetime_s(value: Any) -> float:
    """`expires_in` in seconds when it is a sane number (a numeric string too), else the
    documented 15 minutes; at most a day."""
    if isinstance(value, str):
        value = _seconds(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return DEFAULT_TOKEN_LIFETIME_S
    if not math.isfinite(value) or value <= 0:
        return DEFAULT_TOKEN_LIFETIME_S
    return min(float(value), MAX_TOKEN_LIFETIME_S)


def _exc_code(exc: BaseException) -> str:
    return "timeout" if isinstance(exc, TimeoutError) else "connection"


def _is_size_code(code: str) -> bool:
    return any(word in code for word in ("too-many", "too-large", "size", "payload"))
