"""Segment updates and deletions as Criteo answers them: in bulk, with partial approval.

Both calls take a list of segments and answer 200 even when some items fail: what
succeeded is in ``data``, each failure is a problem pointing at its item (``@data/N``),
under ``warnings`` for Retail Media and ``errors`` for Marketing Solutions (the
documented behaviour of each; a client must read both). Create and search live in
``syncd.sandbox.contract``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from syncd.sandbox.config import RETAIL_MEDIA
from syncd.sandbox.contract import text_value, validation_error
from syncd.sandbox.errors import problem
from syncd.sandbox.state import SandboxState, Segment, now_iso


def _items(body: Any) -> list[Any] | web.Response:
    items = body.get("data") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return validation_error("required-field-missing", "data must be a list of segments")
    return items


def _find(
    state: SandboxState, api: str, account: str | None, item: Any, where: str
) -> Segment | dict[str, Any]:
    segment_id = item.get("id") if isinstance(item, dict) else None
    segment = state.segments.get(str(segment_id)) if segment_id is not None else None
    if segment is None or segment.api != api or (account and segment.account_id != account):
        detail = f"segment {segment_id} was not found"
        return problem("validation", "segment-not-found", detail, where)
    return segment


def _update_one(
    state: SandboxState, api: str, account: str | None, item: Any, n: int
) -> Segment | dict[str, Any]:
    where = f"@data/{n}"
    segment = _find(state, api, account, item, where)
    if not isinstance(segment, Segment):
        return segment
    if segment.read_only:
        detail = f"segment {segment.id} was created in Criteo's UI and is read-only"
        return problem("validation", "segment-is-read-only", detail, where)
    attrs = item.get("attributes")
    attrs = attrs if isinstance(attrs, dict) else {}
    name = attrs.get("name", segment.name)
    if not isinstance(name, str) or not name.strip():
        return problem("validation", "name-must-not-be-empty", "name must not be empty", where)
    if len(name) > 255:
        return problem("validation", "name-must-not-be-too-long", "name is too long", where)
    folded = name.casefold()
    for other in state.segments.values():
        if (
            other is not segment
            and other.api == api
            and other.account_id == segment.account_id
            and other.name.casefold() == folded
        ):
            detail = f"a segment named {name!r} already exists"
            return problem("validation", "name-must-be-unique", detail, where)
    segment.name = name
    if "description" in attrs:
        segment.description = text_value(attrs["description"])
    segment.updated_at = now_iso()
    return segment


def _delete_one(
    state: SandboxState, api: str, account: str | None, item: Any, n: int
) -> Segment | dict[str, Any]:
    where = f"@data/{n}"
    segment = _find(state, api, account, item, where)
    if not isinstance(segment, Segment):
        return segment
    if segment.in_use:
        detail = f"segment {segment.id} is used in an audience"
        return problem("validation", "segment-must-not-be-used-in-audience", detail, where)
    del state.segments[segment.id]
    return segment


def _bulk_answer(api: str, done: list[dict[str, Any]], failures: list[Any]) -> web.Response:
    errors, warnings = ([], failures) if api == RETAIL_MEDIA else (failures, [])
    return web.json_response({"data": done, "errors": errors, "warnings": warnings})


def update_answer(state: SandboxState, api: str, account: str | None, body: Any) -> web.Response:
    """Rename or re-describe the segments an update body lists."""
    items = _items(body)
    if isinstance(items, web.Response):
        return items
    done: list[dict[str, Any]] = []
    failures: list[Any] = []
    for n, item in enumerate(items):
        outcome = _update_one(state, api, account, item, n)
        if isinstance(outcome, Segment):
            done.append(outcome.entity())
        else:
            failures.append(outcome)
    return _bulk_answer(api, done, failures)


def delete_answer(state: SandboxState, api: str, account: str | None, body: Any) -> web.Response:
    """Delete the segments a delete body lists; answers their ids."""
    items = _items(body)
    if isinstance(items, web.Response):
        return items
    done: list[dict[str, Any]] = []
    failures: list[Any] = []
    for n, item in enumerate(items):
        outcome = _delete_one(state, api, account, item, n)
        if isinstance(outcome, Segment):
            done.append({"id": outcome.id, "type": "AudienceSegment", "attributes": {}})
        else:
            failures.append(outcome)
    return _bulk_answer(api, done, failures)
