"""The Criteo client: OAuth token, the two contact-list amendment endpoints, answer reading.

One request per call, classified: an answer, a RetryableError (timeouts, dropped
connections, 408, 429, 5xx) or a PermanentError (other 4xx). Retrying is the
caller's business (push.py), so the policy lives in one place. A 401 is the one
exception: the token is fetched again and the request re-sent once, here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from syncd import __version__
from syncd.config import Settings
from syncd.errors import (
    PayloadTooLarge,
    PermanentError,
    RetryableError,
    RunAbortingError,
)
from syncd.identifiers import MARKETING_SOLUTIONS, wire_name
from syncd.logging import get_logger

log = get_logger(__name__)

TOKEN_REFRESH_MARGIN_S = 60.0  # fetch a new token this long before the old one expires
_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Target:
    """Where a chunk goes: a linked Criteo segment."""

    api: str
    segment_id: str
    identifier_type: str
    account_id: str | None = None
    gum_caller_id: int | None = None


@dataclass(frozen=True)
class AmendmentResult:
    """Criteo's answer to one add/remove request."""

    http_status: int
    nb_valid: int | None
    nb_invalid: int | None
    sample_invalid: list[str] = field(default_factory=list)
    request_date: datetime | None = None
    contact_list_id: str | None = None
    warnings: list[Any] = field(default_factory=list)
    errors: list[Any] = field(default_factory=list)


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
        self.requests_sent = 0

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

    # --- amendments ---------------------------------------------------------------------

    def amendment_url(self, target: Target) -> str:
        s = self._settings
        base = f"{s.criteo_api_url}/{s.criteo_api_version}"
        if target.api == MARKETING_SOLUTIONS:
            return f"{base}/marketing-solutions/audience-segments/{target.segment_id}/contact-list"
        return f"{base}/retail-media/audience-segments/{target.segment_id}/contact-list/add-remove"

    async def amend(
        self, target: Target, body: AmendmentBody, idempotency_key: str
    ) -> AmendmentResult:
        """Send one add or remove request (see amendment_body); re-send once with a new
        token after a 401."""
        for attempt in (1, 2):
            token = await self.token(force=attempt == 2)
            result = await self._send(target, body, token, idempotency_key)
            if result is not None:
                return result
        raise RunAbortingError(
            "Criteo answered 401 to a freshly fetched token: the app lacks access "
            "(check the 'Audiences Manage' permission)",
            status=401,
            code="authorization",
        )

    async def _send(
        self, target: Target, body: AmendmentBody, token: str, idempotency_key: str
    ) -> AmendmentResult | None:
        method = "PATCH" if target.api == MARKETING_SOLUTIONS else "POST"
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            # The same key on every attempt of a chunk: a retry is recognisable as one.
            "Idempotency-Key": idempotency_key,
            # Streamed with its size known: a plain request, not a chunked one.
            "Content-Length": str(body.size),
        }
        self.requests_sent += 1
        try:
            async with self._session.request(
                method,
                self.amendment_url(target),
                data=body.pieces(),
                headers=headers,
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
            if not isinstance(payload, dict):
                # Criteo probably applied it; sending again is harmless (add/remove are set
                # operations), not knowing is not.
                raise RetryableError("Criteo's answer could not be read", status=status)
            return parse_amendment(status, payload)
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


@dataclass(frozen=True)
class AmendmentBody:
    """One add/remove request body, streamed: a JSON envelope around the identifiers'
    JSON array, whose bytes `identifiers()` yields in pieces, afresh for every attempt.

    The size is known up front (Content-Length), so the request is a plain one, not
    chunked, and the process never holds more than a piece of it.
    """

    head: bytes
    identifiers_bytes: int
    identifiers: Callable[[], AsyncIterator[bytes]]
    tail: bytes = b"}}}"

    @property
    def size(self) -> int:
        return len(self.head) + self.identifiers_bytes + len(self.tail)

    async def pieces(self) -> AsyncIterator[bytes]:
        yield self.head
        sent = 0
        async for piece in self.identifiers():
            sent += len(piece)
            yield piece
        if sent != self.identifiers_bytes:
            # The payload went away (another run finished the chunk): abort the request.
            raise RetryableError(
                f"the chunk's payload changed while it was sent ({sent} of "
                f"{self.identifiers_bytes} bytes)",
                code="payload_changed",
            )
        yield self.tail


def amendment_body(
    target: Target,
    operation: str,
    identifiers_bytes: int,
    identifiers: Callable[[], AsyncIterator[bytes]],
) -> AmendmentBody:
    """The request body around identifiers that arrive as UTF-8 JSON array bytes (as
    PostgreSQL encoded them at plan time): they never become Python strings."""
    attributes: dict[str, Any] = {
        "operation": operation,
        "identifierType": wire_name(target.identifier_type, target.api),
    }
    if target.gum_caller_id is not None and target.identifier_type == "gum":
        attributes["gumCallerId"] = target.gum_caller_id
    kind = "ContactlistAmendment" if target.api == MARKETING_SOLUTIONS else "AddRemoveContactlist"
    head = json.dumps({"data": {"type": kind, "attributes": attributes}})
    assert head.endswith("}}}")
    return AmendmentBody(
        head=head[:-3].encode() + b', "identifiers": ',
        identifiers_bytes=identifiers_bytes,
        identifiers=identifiers,
    )


def parse_amendment(status: int, payload: dict[str, Any]) -> AmendmentResult:
    """Read both documented shapes: counts under data.attributes (docs) or under data (SDK)."""
    data = payload.get("data")
    if isinstance(data, list):  # not documented for this call; read the first item if any
        data = data[0] if data else {}
    if not isinstance(data, dict):
        data = {}
    attributes = data.get("attributes")
    fields = attributes if isinstance(attributes, dict) else data
    contact_list_id = fields.get("contactListId")
    return AmendmentResult(
        http_status=status,
        nb_valid=_int_or_none(fields.get("nbValidIdentifiers")),
        nb_invalid=_int_or_none(fields.get("nbInvalidIdentifiers")),
        sample_invalid=[str(x) for x in fields.get("sampleInvalidIdentifiers") or []],
        request_date=_parse_date(fields.get("requestDate")),
        # json keeps big integers exact; store as text so nothing rounds it through a float.
        contact_list_id=None if contact_list_id is None else str(contact_list_id),
        warnings=list(payload.get("warnings") or []),
        errors=list(payload.get("errors") or []),
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


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _parse_date(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
