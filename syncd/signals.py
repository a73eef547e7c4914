"""SIGTERM and SIGINT become one stop event: the one place syncd handles signals.

A long-running command (`sync`, `sandbox`, the daemon next) takes the event and stops
the way it knows how: stop claiming, finish what is in flight, hand the rest back.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_until_signalled(job: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run `job(stop)` in a new event loop; SIGTERM or SIGINT sets `stop`."""

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        try:
            return await job(stop)
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    return asyncio.run(runner())
