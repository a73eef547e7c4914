"""The ``/_sandbox/`` control endpoints (no auth, JSON) a test or a user steers the sandbox
with: seed segments, script faults, expire tokens, read counters, reset."""

from __future__ import annotations

import json
from typing import Any

import structlog
from aiohttp import web

from syncd.sandbox.faults import FaultSpecError
from syncd.sandbox.state import SANDBOX_STATE

log = structlog.get_logger(__name__)


control_routes = web.RouteTableDef()


def _control_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _control_body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


@control_routes.post("/_sandbox/segments", name="control_add_segment")
async def control_add_segment(request: web.Request) -> web.Response:
    """Seed a segment without the create API: ``{"api", "identifier_type", "account_id"}``."""
    body = await _control_body(request)
    if body is None:
        return _control_error(400, "the body must be a JSON object")
    try:
        segment = request.app[SANDBOX_STATE].seed_segment(body)
    except KeyError as exc:
        return _control_error(409, str(exc.args[0]))
    except ValueError as exc:
        return _control_error(400, str(exc))
    return web.json_response({"id": segment.id})


@control_routes.get("/_sandbox/segments/{segment_id}", name="control_get_segment")
async def control_get_segment(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    segment = state.segments.get(request.match_info["segment_id"])
    if segment is None:
        return _control_error(404, "no such segment")
    out: dict[str, Any] = {
        "id": segment.id,
        "api": segment.api,
        "identifier_type": segment.identifier_type,
        "account_id": segment.account_id,
        "name": segment.name,
        "size": segment.size(state.config.keep_members),
    }
    if request.query.get("members") in ("1", "true"):
        out["members"] = sorted(segment.members)
    return web.json_response(out)


@control_routes.post("/_sandbox/faults", name="control_set_faults")
async def control_set_faults(request: web.Request) -> web.Response:
    """Change the fault settings present in the body; ``script`` replaces the pending one."""
    injector = request.app[SANDBOX_STATE].faults
    body = await _control_body(request)
    if body is None:
        return _control_error(400, "the body must be a JSON object")
    try:
        injector.update(body)
    except FaultSpecError as exc:
        return _control_error(400, str(exc))
    log.info("sandbox_faults_set", scripted=len(injector.script))
    return web.json_response(injector.to_json())


@control_routes.get("/_sandbox/faults", name="control_get_faults")
async def control_get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[SANDBOX_STATE].faults.to_json())


@control_routes.post("/_sandbox/expire-tokens", name="control_expire_tokens")
async def control_expire_tokens(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    state.expire_tokens()
    log.info("sandbox_tokens_expired", tokens=len(state.tokens))
    return web.json_response({"expired": len(state.tokens)})


@control_routes.get("/_sandbox/stats", name="control_stats")
async def control_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[SANDBOX_STATE].stats())


@control_routes.post("/_sandbox/reset", name="control_reset")
async def control_reset(request: web.Request) -> web.Response:
    request.app[SANDBOX_STATE].reset()
    log.info("sandbox_reset")
    return web.json_response({"reset": True})
