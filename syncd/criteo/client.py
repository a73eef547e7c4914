"""The Criteo client: one aiohttp session, the OAuth token, and one classified call.

One request per call, classified: an answer, a RetryableError (timeouts, dropped
connections, 408, 429, 5xx) or a PermanentError (other 4xx). Retrying is the
caller's business (push.py), so the policy lives in one place. A 401 is the one
exception: the token is fetched again and the request re-sent once, here. What is
sent where (amendments, and segment management next) lives beside this module.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from syncd import __version__
from syncd.config import Settings
from syncd.criteo.pacing import Cooldown, Pacer
from syncd.errors import (
    PayloadTooLarge,
    PermanentError,
    RetryableError,
    RunAbortingError,
)
from syncd.logging import get_logger

log = get_logger(__name__)

TOKEN_REFRESH_MARGIN_S = 60.0  # fetch a new token this long before the old one expires
_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Answer:
    """A 2xx answer: its status, its JSON body (None when unreadable) and its headers."""

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
    ) -> None:
        self._settings = settings
        self._session = session
        self._clock = clock
        self._token: str | None = None
        self._token_expires_at = 0.0
        self._token_lock = asyncio.Lock()
        self._deprecation_logged = False
        self.pacer = Pacer(settings.rate_limit_per_min, clock)
        self.cooldown = Cooldown(clock)

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[CriteoClient]:
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
            yield cls(settings, session)

    # --- token --------------------------------------------------------------------------

    async def token(self, *, force: bool = False) -> str:
        async with self._token_lock:
            if force or self._token is None or self._clock() >= self._token_expires_at:
                await self._fetch_token()
            assert self._token is not None
            return self._token

    async def _fetch_token(self) -> None:
        s = self._settings
        form = {
            "grant_type": "client_credentials",
            "client_id": s.criteo_client_id,
            "client_secret": s.criteo_client_secret.reveal(),
        }
        try:
            async with self._session.post(s.token_url, data=form) as resp:
                body = await _read_json(resp)
                status = resp.status
                retry_after = retry_after_s(resp.headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise RetryableError(
                f"token request failed: {type(exc).__name__}", code=_exc_code(exc)
            ) from None
        if status in _RETRYABLE_STATUSES:
            raise RetryableError(
                f"token request answered {status}", status=status, retry_after_s=retry_after
            )
        if status != 200 or not isinstance(body, dict) or "access_token" not in body:
            code = body.get("error") if isinstance(body, dict) else None
            raise RunAbortingError(
                f"Criteo refused the credentials in CRITEO_CLIENT_ID / CRITEO_CLIENT_SECRET "
                f"(HTTP {status}{', ' + str(code) if code else ''})",
                status=status,
                code=str(code or "token-refused"),
            )
        lifetime = float(body.get("expires_in") or 900)
        self._token = str(body["access_token"])
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
    ) -> Answer:
        """One authorised JSON call, classified: a 2xx Answer, or RetryableError,
        PermanentError, PayloadTooLarge, RunAbortingError. After a 401 the token is
        fetched again and the call re-sent once. `body()` yields the request body afresh
        for each sending; its `size` bytes are sent with a Content-Length."""
        for attempt in (1, 2):
            token = await self.token(force=attempt == 2)
            answer = await self._send(method, path, body, size, token, idempotency_key)
            if answer is not None:
                return answer
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
            async with self._session.request(
                method, self.url(path), data=body(), headers=headers
            ) as resp:
                payload = await _read_json(resp)
                status = resp.status
                resp_headers = resp.headers
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise RetryableError(
                f"request failed: {type(exc).__name__}", code=_exc_code(exc)
            ) from None
        self._check_deprecation(resp_headers)
        if status == 401:
            return None
        if 200 <= status < 300:
            return Answer(status, payload, resp_headers)
        code, detail = error_code(payload)
        message = (
            f"HTTP {status}{': ' + code if code else ''}{' (' + detail + ')' if detail else ''}"
        )
        if status in _RETRYABLE_STATUSES:
            raise RetryableError(
                message, status=status, code=code, retry_after_s=retry_after_s(resp_headers)
            )
        if status == 410:
            raise RunAbortingError(
                f"Criteo API version {self._settings.criteo_api_version} is retired (410 Gone); "
                "set CRITEO_API_VERSION to a supported version",
                status=status,
                code=code or "gone",
            )
        if status == 413 or (status == 400 and code and _is_size_code(code)):
            raise PayloadTooLarge(message, status=status, code=code, body=payload)
        raise PermanentError(message, status=status, code=code, body=payload)

    def _check_deprecation(self, headers: Any) -> None:
        if self._deprecation_logged or "Deprecation" not in headers:
            return
        self._deprecation_logged = True
        log.warning(
            "criteo_api_version_deprecated",
            api_version=self._settings.criteo_api_version,
            sunset=headers.get("Sunset"),
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
            detail = first.get("detail") or first.get("title")
            return (str(first["code"]) if first.get("code") else None), (
                str(detail)[:500] if detail else None
            )
    if payload.get("error"):
        return str(payload["error"]), None
    return None, None


def retry_after_s(headers: Any, now: Callable[[], float] = time.time) -> float | None:
    """How long the API asked us to wait: Retry-After (seconds or HTTP-date), else the
    documented x-ratelimit-reset (epoch seconds), else None."""
    raw = headers.get("Retry-After")
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            try:
                when = parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                when = None
            if when is not None:
                if when.tzinfo is None:
                    when = when.replace(tzinfo=UTC)
                return max(0.0, when.timestamp() - now())
    reset = headers.get("x-ratelimit-reset")
    if reset:
        try:
            return max(0.0, float(reset) - now())
        except ValueError:
            return None
    return None


async def _read_json(resp: aiohttp.ClientResponse) -> Any:
    text = await resp.text()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _exc_code(exc: BaseException) -> str:
    return "timeout" if isinstance(exc, TimeoutError) else "connection"


def _is_size_code(code: str) -> bool:
    return any(word in code for word in ("too-many", "too-large", "size", "payload"))
