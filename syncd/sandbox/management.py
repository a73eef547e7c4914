"""Segment creation, updates and deletions as Criteo answers them: in bulk, with partial
approval.

Each call takes a list of segments and answers 200 even when some items fail: what
succeeded is in ``data``, each failure is a problem pointing at its item (``@data/N``),
under ``warnings`` for Retail Media and ``errors`` for Marketing Solutions (the
documented behaviour of each; a client must read both). Search lives in
``syncd.sandbox.contract``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from syncd.sandbox.config import RETAIL_MEDIA, RM_TYPES
from syncd.sandbox.contract import validation_error
from syncd.sandbox.errors import problem
from syncd.sandbox.state import SandboxState, Segment, now_iso

Problem = dict[str, Any]
# One item of a bulk call: the segment it made, changed or removed, or the problem.
ItemHandler = Callable[[SandboxState, str, "str | None", Any, str], "Segment | Problem"]


def text_value(value: object) -> str | None:
    # Marketing Solutions samples wrap descriptions as {"value": "..."}.
    if isinstance(value, dict):
        value = value.get("value")
    return value if isinstance(value, str) else None


def _name_problem(
    state: SandboxState, api: str, account: str, name: object, where: str, itself: object = None
) -> Problem | None:
    """Why a segment may not have this name in this account, if it may not."""
    if not isinstance(name, str) or not name.strip():
        return problem("validation", "name-must-not-be-empty", "name must not be empty", where)
    if len(name) > 255:
        return problem("validation", "name-must-not-be-too-long", "name is too long", where)
    folded = name.casefold()
    for other in state.segments.values():
        if (
            other is not itself
            and other.api == api
            and other.account_id == account
            and other.name.casefold() == folded
        ):
            detail = f"a segment named {name!r} already exists"
            return problem("validation", "name-must-be-unique", detail, where)
    return None


def _create_one(
    state: SandboxState, api: str, account: str | None, item: Any, where: str
) -> Segment | Problem:
    attrs = item.get("attributes") if isinstance(item, dict) else None
    if not isinstance(attrs, dict):
        return problem("validation", "required-field-missing", "attributes are required", where)
    contact_list = attrs.get("contactList")
    if not isinstance(contact_list, dict):
        detail = "only contact-list segments can be created through the API"
        return problem("validation", "contact-list-required", detail, where)
    identifier_type: str | None = None
    if api == RETAIL_MEDIA:
        raw = contact_list.get("identifierType")
        identifier_type = RM_TYPES.get(raw.lower()) if isinstance(raw, str) else None
        if identifier_type is None:
            detail = f"contactList.identifierType must be one of {', '.join(RM_TYPES.values())}"
            return problem("validation", "invalid-identifier-type", detail, where)
    else:
        advertiser = attrs.get("advertiserId")
        account = str(advertiser) if isinstance(advertiser, str | int) else None
        if not account:
            return problem(
                "validation", "advertiser-id-required", "advertiserId is required", where
            )
    assert account is not None
    name = attrs.get("name")
    refused = _name_problem(state, api, account, name, where)
    if refused is not None:
        return refused
    assert isinstance(name, str)
    retailer = attrs.get("retailerId")
    return state.add_segment(
        api,
        account,
        identifier_type,
        name=name,
        description=text_value(attrs.get("description")),
        retailer_id=str(retailer) if isinstance(retailer, str | int) else None,
    )


def _find(
    state: SandboxState, api: str, account: str | None, item: Any, where: str
) -> Segment | Problem:
    segment_id = item.get("id") if isinstance(item, dict) else None
    segment = state.segments.get(str(segment_id)) if segment_id is not None else None
    if segment is None or segment.api != api or (account and segment.account_id != account):
        detail = f"segment {segment_id} was not found"
        return problem("validation", "segment-not-found", detail, where)
    return segment


def _update_one(
    state: SandboxState, api: str, account: str | None, item: Any, where: str
) -> Segment | Problem:
    segment = _find(state, api, account, item, where)
    if not isinstance(segment, Segment):
        return segment
    if segment.read_only:
        detail = f"segment {segment.id} was created in Criteo's UI and is read-only"
        return problem("validation", "segment-is-read-only", detail, where)
    attrs = item.get("attributes")
    attrs = attrs if isinstance(attrs, dict) else {}
    name = attrs.get("name", segment.name)
    refused = _name_problem(state, api, segment.account_id, name, where, itself=segment)
    if refused is not None:
        return refused
    segment.name = name
    if "description" in attrs:
        segment.description = text_value(attrs["description"])
    segment.updated_at = now_iso()
    return segment


def _delete_one(
    state: SandboxState, api: str, account: str | None, item: Any, where: str
) -> Segment | Problem:
    segment = _find(state, api, account, item, where)
    if not isinstance(segment, Segment):
        return segment
    if segment.in_use:
        detail = f"segment {segment.id} is used in an audience"
        return problem("validation", "segment-must-not-be-used-in-audience", detail, where)
    del state.segments[segment.id]
    return segment


def _bulk(
    state: SandboxState,
    api: str,
    account: str | None,
    body: Any,
    one: ItemHandler,
    render: Callable[[Segment], dict[str, Any]],
) -> web.Response:
    items = body.get("data") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return validation_error("required-field-missing", "data must be a list of segments")
    done: list[dict[str, Any]] = []
    failures: list[Problem] = []
    for n, item in enumerate(items):
        outcome = one(state, api, account, item, f"@data/{n}")
        if isinstance(outcome, Segment):
            done.append(render(outcome))
        else:
            failures.append(outcome)
    errors, warnings = ([], failures) if api == RETAIL_MEDIA else (failures, [])
    return web.json_response({"data": done, "errors": errors, "warnings": warnings})


def _id_only(segment: Segment) -> dict[str, Any]:
    return {"id": segment.id, "type": "AudienceSegment", "attributes": {}}


def create_answer(state: SandboxState, api: str, account: str | None, body: Any) -> web.Response:
    """Create the segments a create body lists; ``account`` is the path's, if any."""
    return _bulk(state, api, account, body, _create_one, Segment.entity)


def update_answer(state: SandboxState, api: str, account: str | None, body: Any) -> web.Response:
    """Rename or re-describe the segments an update body lists."""
    return _bulk(state, api, account, body, _update_one, Segment.entity)


def delete_answer(state: SandboxState, api: str, account: str | None, body: Any) -> web.Response:
    """Delete the segments a delete body lists; answers their ids."""
    return _bulk(state, api, account, body, _delete_one, _id_only)
