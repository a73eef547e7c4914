"""The sandbox application: its routes and middleware (versions, auth, rate limit,
bookkeeping), and starting and stopping it on a real socket.

The rest of the package is split by concept: ``config`` (what it is started with),
``state`` (what it remembers), ``contract`` (Criteo's request rules and answer bodies),
``faults`` (fault injection), ``control`` (the ``/_sandbox/`` endpoints), ``errors``
(Criteo-style error answers).
"""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import structlog
from aiohttp import web
from yarl import URL

from syncd.sandbox.budget import RateLimitMode
from syncd.sandbox.config import MARKETING_SOLUTIONS, RETAIL_MEDIA, SandboxConfig
from syncd.sandbox.contract import (
    amendment_answer,
    apply_amendment,
    cleared_answer,
    describe,
    json_body,
    paging,
    search_answer,
    segment_not_found,
    statistics_answer,
    validate_amendment,
)
from syncd.sandbox.control import control_routes
from syncd.sandbox.errors import error_response, problem
from syncd.sandbox.faults import DroppedResponse, cut_upload, with_faults
from syncd.sandbox.management import create_answer, delete_answer, update_answer
from syncd.sandbox.state import SANDBOX_STATE, SandboxState, Segment

log = structlog.get_logger(__name__)

SERVED_VERSIONS = frozenset({"2026-07", "2027-01", "preview"})
DEPRECATED_VERSIONS = {"2026-01": "Wed, 27 Jan 2027 00:00:00 GMT"}  # version -> Sunset
_VERSION = re.compile(r"\d{4}-\d{2}")
_MAX_BODY = 64 * 1024 * 1024  # 50,000 long identifiers are ~4 MB; aiohttp's default is 1 MiB


# --- lookups -------------------------------------------------------------------------


def _segment(state: SandboxState, request: web.Request, api: str) -> Segment | None:
    segment = state.segments.get(request.match_info["segment_id"])
    if segment is None or segment.api != api:
        return None
    account = request.match_info.get("account_id")
    if account is not None and segment.account_id != account:
        return None
    return segment


# --- OAuth2 --------------------------------------------------------------------------


async def token(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    state.token_requests += 1
    form = await request.post()
    grant = form.get("grant_type")
    if not grant:
        return web.json_response({"error": "invalid_request"}, status=400)
    config = state.config
    client_id = str(form.get("client_id", ""))
    expected = config.credentials().get(client_id, "")
    secret_ok = secrets.compare_digest(str(form.get("client_secret", "")), expected)
    if not (expected and secret_ok):
        return web.json_response({"error": "invalid_client"}, status=401)
    if grant != "client_credentials":
        return web.json_response({"error": "unsupported_grant_type"}, status=400)
    # refresh_token: null because the official SDKs read that key unconditionally.
    return web.json_response(
        {
            "access_token": state.issue_token(client_id),
            "token_type": "Bearer",
            "expires_in": config.token_ttl_s,
            "refresh_token": None,
        }
    )


# --- contact-list amendments -----------------------------------------------------------


def _log_entry(request: web.Request, state: SandboxState, operation: str | None) -> dict[str, Any]:
    """A request-log line for an amendment or a clear, filled in as the request goes."""
    return {
        "segment_id": request.match_info["segment_id"],
        "method": request.method,
        "operation": operation,
        "identifier_type": None,
        "count": 0,
        "status": 0,  # 0: the connection was dropped without an answer
        "applied": False,
        "fault": None,
        "idempotency_key": request.headers.get("Idempotency-Key"),
        "client_id": state.client_of(request.headers.get("Authorization")),
        "at": time.time(),
    }


async def _amend(request: web.Request, api: str) -> web.StreamResponse:
    state = request.app[SANDBOX_STATE]
    entry = _log_entry(request, state, None)
    try:
        cut = cut_upload(request, state.faults, entry)
        if cut is not None:
            return cut
        # The whole body is read first, so a dropped connection is a clean disconnect
        # for the client rather than a reset in the middle of its upload.
        body, bad_json = await json_body(request)
        describe(body, entry)
        state.identifiers_received += entry["count"]
        # In flight from here: body read, and the latency is read below with no await in
        # between, so whoever sees this request in flight knows the latency it was given.
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)

        def answer() -> web.Response:
            segment = _segment(state, request, api)
            if segment is None:
                return segment_not_found(entry["segment_id"])
            if bad_json is not None:
                return bad_json
            change = validate_amendment(body, api, segment)
            if isinstance(change, web.Response):
                return change
            n_valid, invalid = apply_amendment(state, segment, change)
            entry["applied"] = True
            return amendment_answer(state, segment, change, n_valid=n_valid, invalid=invalid)

        try:
            response = await with_faults(request, state.faults, entry, answer)
        finally:
            state.in_flight -= 1
        entry["status"] = 0 if isinstance(response, DroppedResponse) else response.status
        return response
    finally:
        state.log.append(entry)


# --- clear and statistics ----------------------------------------------------------------


async def _clear(request: web.Request, api: str) -> web.StreamResponse:
    """Empty a segment's list; latency and faults (scripted or random) as for an
    amendment, and a line in the request log."""
    state = request.app[SANDBOX_STATE]
    entry = _log_entry(request, state, "clear")

    def answer() -> web.Response:
        segment = _segment(state, request, api)
        if segment is None:
            return segment_not_found(entry["segment_id"])
        segment.members.clear()
        segment.counted = 0
        entry["applied"] = True
        return cleared_answer(segment)

    try:
        response = await with_faults(request, state.faults, entry, answer)
        entry["status"] = 0 if isinstance(response, DroppedResponse) else response.status
        return response
    finally:
        state.log.append(entry)


async def _statistics(request: web.Request, api: str) -> web.Response:
    state = request.app[SANDBOX_STATE]
    await asyncio.sleep(state.faults.latency_s())
    segment = _segment(state, request, api)
    if segment is None:
        return segment_not_found(request.match_info["segment_id"])
    return statistics_answer(segment, state.config.keep_members)


# --- segment management -------------------------------------------------------------------


BulkAnswer = Callable[[SandboxState, str, "str | None", Any], web.Response]


async def _bulk(request: web.Request, api: str, answer: BulkAnswer) -> web.Response:
    """Create, update or delete: a JSON body, the path's account if any, one answer."""
    body, bad_json = await json_body(request)
    if bad_json is not None:
        return bad_json
    account = request.match_info.get("account_id")
    return answer(request.app[SANDBOX_STATE], api, account, body)


async def _search(request: web.Request, api: str) -> web.Response:
    state = request.app[SANDBOX_STATE]
    page = paging(request.query, api)
    if isinstance(page, web.Response):
        return page
    offset, limit = page
    body, bad_json = await json_body(request)
    if bad_json is not None:
        return bad_json
    account = request.match_info.get("account_id")
    return search_answer(state, api, account, body, offset, limit)


# --- versions, auth, rate limit, bookkeeping -------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _guarded(
    request: web.Request, handler: Handler, first: str, headers: dict[str, str]
) -> web.StreamResponse:
    state = request.app[SANDBOX_STATE]
    if first != "oauth2":
        if first in DEPRECATED_VERSIONS:
            headers |= {"Deprecation": "true", "Sunset": DEPRECATED_VERSIONS[first]}
        elif _VERSION.fullmatch(first) and first not in SERVED_VERSIONS:
            return error_response(
                410, problem("deprecation", "api-version-retired", f"version {first} is retired")
            )
        elif first not in SERVED_VERSIONS:
            return error_response(404, problem("unknown", "not-found", "no such endpoint"))
        denied = state.check_token(request.headers.get("Authorization"))
        if denied is not None:
            detail = "the access token has expired" if denied.endswith("expired") else "bad token"
            return error_response(401, problem("authorization", denied, detail, "@headers"))
        refused = _over_budget(state, request)
        if refused is not None:
            return refused
    try:
        return await handler(request)
    except web.HTTPException as exc:
        # Router misses (404/405) and oversized bodies (413) answer in Criteo's shape too.
        code = exc.reason.lower().replace(" ", "-")
        return error_response(exc.status, problem("unknown", code, exc.reason), headers=None)


def _mode(raw: str) -> RateLimitMode:
    return "bucket" if raw == "bucket" else "window"


def _over_budget(state: SandboxState, request: web.Request) -> web.Response | None:
    """A 429 when the calling app's budget is spent (spending one call otherwise)."""
    s = state.faults.settings
    client_id = state.client_of(request.headers.get("Authorization"))
    if s.rate_limit_per_minute is None or client_id is None:
        return None
    limit, mode, burst = s.rate_limit_per_minute, _mode(s.rate_limit_mode), s.rate_limit_burst
    if state.budgets.acquire(client_id, limit, mode, burst):
        return None
    # Criteo does not document Retry-After: only x-ratelimit-reset says when, unless asked.
    retry_after = state.budgets.retry_after_s(client_id, limit, mode, burst)
    return error_response(
        429,
        problem("quota", "too-many-requests", "the per-minute budget is spent"),
        headers={"Retry-After": str(retry_after)} if s.rate_limit_retry_after else None,
    )


@web.middleware
async def _api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    first = request.path.split("/", 2)[1]
    if first == "_sandbox":
        return await handler(request)
    state = request.app[SANDBOX_STATE]
    headers: dict[str, str] = {}
    response = await _guarded(request, handler, first, headers)
    s = state.faults.settings
    client_id = state.client_of(request.headers.get("Authorization"))
    if s.rate_limit_per_minute is not None and client_id is not None:
        # Every answer to an app's call says where its budget stands.
        headers |= state.budgets.headers(
            client_id, s.rate_limit_per_minute, _mode(s.rate_limit_mode), s.rate_limit_burst
        )
    dropped = isinstance(response, DroppedResponse)
    if not dropped:
        response.headers.update(headers)
    name = request.match_info.route.name or "unmatched"
    state.count(name, "dropped" if dropped else str(response.status))
    return response


_RM = "/{version}/retail-media"
_MS = "/{version}/marketing-solutions"
_RM_ACCOUNT = _RM + "/accounts/{account_id}/audience-segments"
_RM_LIST = _RM + "/audience-segments/{segment_id}/contact-list"
_MS_LIST = _MS + "/audience-segments/{segment_id}/contact-list"
_CREATE = functools.partial(_bulk, answer=create_answer)
_UPDATE = functools.partial(_bulk, answer=update_answer)
_DELETE = functools.partial(_bulk, answer=delete_answer)
# (method, path, handler, api, endpoint name); the name keys /_sandbox/stats "requests".
_ROUTES: tuple[tuple[str, str, Callable[..., Awaitable[web.StreamResponse]], str, str], ...] = (
    ("POST", _RM_LIST + "/add-remove", _amend, RETAIL_MEDIA, "rm_add_remove"),
    ("POST", _RM_LIST + "/clear", _clear, RETAIL_MEDIA, "rm_clear"),
    ("GET", _RM_ACCOUNT + "/{segment_id}/contact-list", _statistics, RETAIL_MEDIA, "rm_statistics"),
    ("POST", _RM_ACCOUNT + "/create", _CREATE, RETAIL_MEDIA, "rm_create"),
    ("POST", _RM_ACCOUNT + "/search", _search, RETAIL_MEDIA, "rm_search"),
    ("PATCH", _RM_ACCOUNT, _UPDATE, RETAIL_MEDIA, "rm_update"),
    ("POST", _RM_ACCOUNT + "/delete", _DELETE, RETAIL_MEDIA, "rm_delete"),
    ("PATCH", _MS_LIST, _amend, MARKETING_SOLUTIONS, "ms_amend"),
    ("DELETE", _MS_LIST, _clear, MARKETING_SOLUTIONS, "ms_clear"),
    ("GET", _MS_LIST + "/statistics", _statistics, MARKETING_SOLUTIONS, "ms_statistics"),
    ("POST", _MS + "/audience-segments/create", _CREATE, MARKETING_SOLUTIONS, "ms_create"),
    ("POST", _MS + "/audience-segments/search", _search, MARKETING_SOLUTIONS, "ms_search"),
    ("PATCH", _MS + "/audience-segments", _UPDATE, MARKETING_SOLUTIONS, "ms_update"),
    ("POST", _MS + "/audience-segments/delete", _DELETE, MARKETING_SOLUTIONS, "ms_delete"),
)


def create_app(config: SandboxConfig) -> web.Application:
    """The sandbox application; its state is ``app[SANDBOX_STATE]``."""
    app = web.Application(middlewares=[_api_middleware], client_max_size=_MAX_BODY)
    app[SANDBOX_STATE] = SandboxState(config)
    app.router.add_post("/oauth2/token", token, name="token")
    for method, path, handler, api, name in _ROUTES:
        app.router.add_route(method, path, functools.partial(handler, api=api), name=name)
    app.router.add_routes(control_routes)
    return app


# --- running it ------------------------------------------------------------------------------


class RunningSandbox:
    """A sandbox serving on a real socket; ``async with`` closes it."""

    def __init__(self, url: str, app: web.Application, runner: web.AppRunner) -> None:
        self.url = url
        self.app = app
        self.state = app[SANDBOX_STATE]
        self._runner: web.AppRunner | None = runner

    async def close(self) -> None:
        """Stop serving; waits at most a second for answers still being written."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> RunningSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def start_sandbox(
    config: SandboxConfig, host: str = "127.0.0.1", port: int = 0
) -> RunningSandbox:
    """Serve a new sandbox on ``host:port`` (port 0: any free port) and return at once."""
    app = create_app(config)
    # A short shutdown timeout: a stalled amendment must not hold a test's teardown.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    return RunningSandbox(str(URL.build(scheme="http", host=host, port=bound_port)), app, runner)


async def serve(
    config: SandboxConfig,
    host: str,
    port: int,
    stop: asyncio.Event,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve until `stop` is set: the ``syncd sandbox`` command (the CLI owns the signals,
    and `announce`, called with the URL once it serves, tells a person how to use it)."""
    async with await start_sandbox(config, host, port) as sandbox:
        log.info("sandbox_listening", url=sandbox.url, client_id=config.client_id)
        if announce is not None:
            announce(sandbox.url)
        await stop.wait()
    log.info("sandbox_stopped")
