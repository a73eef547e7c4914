"""The sandbox's fault injection: how long it waits before answering an amendment, whether
that amendment fails and how (scripted one-shot faults first, then random ones), and the
run-time knobs (including the per-minute budget, which ``budget.Budgets`` counts).
The ``/_sandbox/`` endpoints that steer it live in ``control``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import structlog
from aiohttp import web

from syncd.sandbox.config import SandboxConfig
from syncd.sandbox.errors import error_response, problem

log = structlog.get_logger(__name__)

DROP_BEFORE = "before"
DROP_AFTER = "after"
# Before the request body is read: the client sees its upload cut off half-way.
DROP_UPLOAD = "upload"
_DROPS = (DROP_BEFORE, DROP_AFTER, DROP_UPLOAD)


# --- faults --------------------------------------------------------------------------------


class FaultSpecError(ValueError):
    """A fault script entry or a fault setting sent to /_sandbox/faults is malformed."""


@dataclass(frozen=True)
class Fault:
    """One fault to inject into one amendment request.

    Exactly one of ``status``, ``drop`` and ``stall_s`` is set. ``retry_after`` is the
    Retry-After header value sent verbatim (seconds or an HTTP-date), ``None`` for none.
    A raw answer (``body`` and/or ``headers`` set) is sent exactly as given with its
    status, any 200-599: what a misbehaving API or a proxy in front of it may answer.
    """

    status: int | None = None
    code: str | None = None
    retry_after: str | None = None
    drop: str | None = None
    stall_s: float | None = None
    segment_id: str | None = None
    origin: str = "script"
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] | None = None

    @property
    def raw(self) -> bool:
        return self.body is not None or self.headers is not None

    @property
    def kind(self) -> str:
        if self.drop is not None:
            return f"drop_{self.drop}"
        if self.stall_s is not None:
            return "stall"
        return f"{'raw' if self.raw else 'status'}_{self.status}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.status is not None:
            out["status"] = self.status
        if self.code is not None:
            out["code"] = self.code
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        if self.drop is not None:
            out["drop"] = self.drop
        if self.stall_s is not None:
            out["stall_s"] = self.stall_s
        if self.segment_id is not None:
            out["segment_id"] = self.segment_id
        if self.body is not None:
            out["body_base64"] = base64.b64encode(self.body).decode()
        if self.headers is not None:
            out["headers"] = dict(self.headers)
        return out


def _number(value: object, name: str, *, low: float = 0.0, high: float = math.inf) -> float:
    # bool is an int subclass; "true" as a latency is a caller's mistake, not 1 ms.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultSpecError(f"{name} must be a number")
    if not low <= float(value) <= high:
        raise FaultSpecError(f"{name} must be between {low} and {high}")
    return float(value)


def parse_fault(entry: object) -> Fault:
    """Validate one script entry, e.g. ``{"status": 429, "retry_after": "2"}``, or a raw
    answer ``{"status": 200, "body": "...", "headers": {...}}`` (``body_base64`` for bytes
    that are not UTF-8)."""
    if not isinstance(entry, dict):
        raise FaultSpecError("each script entry must be an object")
    known = {"status", "code", "retry_after", "drop", "stall_s", "segment_id"} | _RAW_KEYS
    unknown = set(entry) - known
    if unknown:
        raise FaultSpecError(f"unknown script keys: {sorted(unknown)}")
    kinds = [key for key in ("status", "drop", "stall_s") if key in entry]
    if len(kinds) != 1:
        raise FaultSpecError("a script entry needs exactly one of status, drop, stall_s")
    segment_id = _segment_id(entry.get("segment_id"))
    if "status" not in entry and _RAW_KEYS & set(entry):
        raise FaultSpecError("body, body_base64 and headers go with a status")
    if "drop" in entry:
        if entry["drop"] not in _DROPS:
            raise FaultSpecError(f"drop must be one of {', '.join(_DROPS)}")
        return Fault(drop=entry["drop"], segment_id=segment_id)
    if "stall_s" in entry:
        stall = _number(entry["stall_s"], "stall_s", high=3600.0)
        return Fault(stall_s=stall, segment_id=segment_id)
    if _RAW_KEYS & set(entry):
        return _raw_fault(entry, segment_id)
    status = entry["status"]
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        raise FaultSpecError("status must be an HTTP error status (400-599)")
    code = entry.get("code")
    if code is not None and not isinstance(code, str):
        raise FaultSpecError("code must be a string")
    retry_after = entry.get("retry_after")
    if retry_after is not None:
        if isinstance(retry_after, bool) or not isinstance(retry_after, str | int | float):
            raise FaultSpecError("retry_after must be a string (seconds or HTTP-date)")
        retry_after = format_retry_after(retry_after)
    return Fault(status=status, code=code, retry_after=retry_after, segment_id=segment_id)


_RAW_KEYS = frozenset({"body", "body_base64", "headers"})


def _segment_id(segment: object) -> str | None:
    if segment is not None and (isinstance(segment, bool) or not isinstance(segment, str | int)):
        raise FaultSpecError("segment_id must be a string")
    return None if segment is None else str(segment)


def _raw_fault(entry: dict[str, Any], segment_id: str | None) -> Fault:
    """A raw answer: any status 200-599, a body sent byte for byte, headers as given."""
    status = entry["status"]
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise FaultSpecError("a raw answer's status must be 200-599")
    if set(entry) & {"code", "retry_after"}:
        raise FaultSpecError("a raw answer takes body and headers, not code or retry_after")
    if "body" in entry and "body_base64" in entry:
        raise FaultSpecError("give body or body_base64, not both")
    body: bytes | None = None
    if "body" in entry:
        if not isinstance(entry["body"], str):
            raise FaultSpecError("body must be a string (body_base64 for other bytes)")
        body = entry["body"].encode()
    elif "body_base64" in entry:
        try:
            body = base64.b64decode(str(entry["body_base64"]), validate=True)
        except (binascii.Error, ValueError):
            raise FaultSpecError("body_base64 must be base64") from None
    headers = entry.get("headers")
    if headers is not None and not (
        isinstance(headers, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
    ):
        raise FaultSpecError("headers must be an object of strings")
    return Fault(
        status=status,
        body=body,
        headers=None if headers is None else tuple(headers.items()),
        segment_id=segment_id,
    )


def format_retry_after(value: str | float) -> str:
    """Seconds as Retry-After wants them: ``2`` rather than ``2.0``; strings pass as sent."""
    if isinstance(value, str):
        return value
    return f"{value:g}"


@dataclass
class FaultSettings:
    """The run-time knobs; /_sandbox/faults changes them, /_sandbox/reset restores them."""

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    fault_rate_5xx: float = 0.0
    fault_rate_429: float = 0.0
    fault_rate_drop: float = 0.0
    retry_after_s: float = 1.0
    rate_limit_per_minute: int | None = None
    rate_limit_mode: str = "window"
    rate_limit_burst: int = 4
    rate_limit_retry_after: bool = False

    @classmethod
    def from_config(cls, config: SandboxConfig) -> FaultSettings:
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_RATES = ("fault_rate_5xx", "fault_rate_429", "fault_rate_drop")


def updated_settings(current: FaultSettings, body: Mapping[str, Any]) -> FaultSettings:
    """A copy of ``current`` with the fields present in ``body`` validated and replaced."""
    values = current.to_json()
    for name in ("latency_ms", "latency_jitter_ms", "retry_after_s"):
        if name in body:
            values[name] = _number(body[name], name, high=3_600_000.0)
    for name in _RATES:
        if name in body:
            values[name] = _number(body[name], name, high=1.0)
    if sum(values[name] for name in _RATES) > 1.0:
        raise FaultSpecError("the fault rates must add up to at most 1")
    if "rate_limit_per_minute" in body:
        limit = body["rate_limit_per_minute"]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise FaultSpecError("rate_limit_per_minute must be a positive integer or null")
        if limit is not None and limit < 1:
            raise FaultSpecError("rate_limit_per_minute must be a positive integer or null")
        values["rate_limit_per_minute"] = limit
    return _budget_settings(values, body)


def _budget_settings(values: dict[str, Any], body: Mapping[str, Any]) -> FaultSettings:
    """The budget's kind, burst and Retry-After switch from a /_sandbox/faults body."""
    if "rate_limit_mode" in body:
        if body["rate_limit_mode"] not in ("window", "bucket"):
            raise FaultSpecError("rate_limit_mode must be 'window' or 'bucket'")
        values["rate_limit_mode"] = body["rate_limit_mode"]
    if "rate_limit_burst" in body:
        burst = body["rate_limit_burst"]
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise FaultSpecError("rate_limit_burst must be a positive integer")
        values["rate_limit_burst"] = burst
    if "rate_limit_retry_after" in body:
        if not isinstance(body["rate_limit_retry_after"], bool):
            raise FaultSpecError("rate_limit_retry_after must be true or false")
        values["rate_limit_retry_after"] = body["rate_limit_retry_after"]
    return FaultSettings(**values)


class FaultInjector:
    """Decides latency and faults; seeded so a benchmark run can be repeated."""

    def __init__(self, config: SandboxConfig) -> None:
        self._config = config
        # Validated like a /_sandbox/faults body: a bad SandboxConfig fails at start-up.
        self.settings = updated_settings(
            FaultSettings(), FaultSettings.from_config(config).to_json()
        )
        self.script: deque[Fault] = deque()
        seed = config.seed
        # Two generators, so changing the jitter does not shift which requests fail.
        self._fault_rng = random.Random(seed)
        self._jitter_rng = random.Random(None if seed is None else seed + 1)

    def reset(self) -> None:
        self.settings = FaultSettings.from_config(self._config)
        self.script.clear()

    def update(self, body: Mapping[str, Any]) -> None:
        """Apply a /_sandbox/faults body; all or nothing, so a typo changes nothing."""
        known = {"script"} | {f.name for f in fields(FaultSettings)}
        unknown = set(body) - known
        if unknown:
            raise FaultSpecError(f"unknown fault settings: {sorted(unknown)}")
        settings = updated_settings(self.settings, body)
        script: list[Fault] | None = None
        if "script" in body:
            if not isinstance(body["script"], list):
                raise FaultSpecError("script must be a list")
            script = [parse_fault(entry) for entry in body["script"]]
        self.settings = settings
        if script is not None:
            self.script = deque(script)

    def take_upload_drop(self, segment_id: str) -> Fault | None:
        """The next scripted fault for this segment if it cuts the upload off (taken
        before the body is read); else None, and the script is left as it was."""
        for index, fault in enumerate(self.script):
            if fault.segment_id is None or fault.segment_id == segment_id:
                if fault.drop != DROP_UPLOAD:
                    return None
                del self.script[index]
                return fault
        return None

    def latency_s(self) -> float:
        s = self.settings
        jitter = self._jitter_rng.uniform(0.0, s.latency_jitter_ms) if s.latency_jitter_ms else 0.0
        return max(0.0, s.latency_ms + jitter) / 1000.0

    def next_fault(self, segment_id: str) -> Fault | None:
        """The fault for the amendment request now being handled, if any.

        Scripted faults come first, in order; an entry bound to another segment waits
        for a request to that segment. Random faults draw one number per request.
        """
        for index, fault in enumerate(self.script):
            if fault.segment_id is None or fault.segment_id == segment_id:
                del self.script[index]
                return fault
        s = self.settings
        if not (s.fault_rate_5xx or s.fault_rate_429 or s.fault_rate_drop):
            return None
        draw = self._fault_rng.random()
        if draw < s.fault_rate_5xx:
            return Fault(status=503, origin="random")
        draw -= s.fault_rate_5xx
        if draw < s.fault_rate_429:
            return Fault(
                status=429, retry_after=format_retry_after(s.retry_after_s), origin="random"
            )
        draw -= s.fault_rate_429
        if draw < s.fault_rate_drop:
            return Fault(drop=DROP_AFTER, origin="random")
        return None

    def to_json(self) -> dict[str, Any]:
        return {**self.settings.to_json(), "script": [fault.to_json() for fault in self.script]}


class DroppedResponse(web.Response):
    """The placeholder a handler returns after closing the connection: nobody receives it."""


def drop_connection(request: web.Request) -> DroppedResponse:
    """Close the client's connection without an answer, without server-side noise.

    Raising from the handler would make aiohttp log "Error handling request" with a
    traceback. Instead the transport is closed and a placeholder answer returned:
    aiohttp fails to write it, takes that for a client that went away, and logs
    nothing above debug. The client sees ServerDisconnectedError (or a reset).
    """
    transport = request.transport
    if transport is not None:
        transport.close()
    return DroppedResponse(status=500, text="connection dropped by the sandbox")


def fault_response(fault: Fault) -> web.Response:
    status = fault.status or 500
    if fault.raw:
        # Sent as given (aiohttp adds an octet-stream Content-Type unless one is named).
        return web.Response(status=status, body=fault.body or b"", headers=fault.headers or ())
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
    if status == 401:
        body = problem("authorization", "authorization-token-expired", "the token has expired")
    elif status == 429:
        body = problem("quota", fault.code or "too-many-requests", "rate limit exceeded")
    elif status >= 500:
        body = problem("availability", fault.code or "service-unavailable", "try again later")
    else:
        body = problem("validation", fault.code or "invalid-request", "injected error")
    return error_response(status, body, headers=headers)


async def with_faults(
    request: web.Request,
    injector: FaultInjector,
    entry: dict[str, Any],
    answer: Callable[[], web.Response],
) -> web.StreamResponse:
    """Wait the latency, then answer an amendment, unless a fault says otherwise.

    ``answer`` validates and applies the amendment; ``entry`` is its request-log line.
    """
    await asyncio.sleep(injector.latency_s())
    fault = injector.next_fault(entry["segment_id"])
    if fault is None:
        return answer()
    entry["fault"] = fault.kind
    log.info(
        "sandbox_fault_injected",
        segment_id=entry["segment_id"],
        fault=fault.kind,
        origin=fault.origin,
    )
    if fault.drop in (DROP_BEFORE, DROP_UPLOAD):
        return drop_connection(request)
    if fault.status is not None:
        return fault_response(fault)
    response = answer()
    if fault.drop == DROP_AFTER:
        return drop_connection(request)
    if fault.stall_s:
        # Applied already: a client that times out here must not assume nothing happened.
        await asyncio.sleep(fault.stall_s)
    return response


def cut_upload(
    request: web.Request, injector: FaultInjector, entry: dict[str, Any]
) -> DroppedResponse | None:
    """Drop the connection before the body is read, if the script says so: the client is
    cut off in the middle of its upload (a reset), not after it."""
    fault = injector.take_upload_drop(entry["segment_id"])
    if fault is None:
        return None
    entry["fault"] = fault.kind
    log.info("sandbox_fault_injected", segment_id=entry["segment_id"], fault=fault.kind)
    return drop_connection(request)
