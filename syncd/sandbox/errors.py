"""Criteo-style error answers: the `errors` array of problem objects every refusal carries."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web


def problem(
    type_: str, code: str, detail: str, instance: str = "@data", title: str | None = None
) -> dict[str, Any]:
    trace = uuid.uuid4().hex
    return {
        "traceId": trace,
        "traceIdentifier": trace,
        "type": type_,
        "code": code,
        "instance": instance,
        "title": title or code.replace("-", " ").capitalize(),
        "detail": detail,
    }


def error_response(
    status: int, *problems: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"errors": list(problems)}, status=status, headers=headers)
