"""SIGTERM and SIGINT become one stop event: the one place syncd handles signals.

A long-running command (`sync`, `sandbox`, `run`) takes the event and stops the way it
knows how: stop claiming, finish what is in flight, hand the rest back. The daemon also
takes a second event, set by a second signal: stop at once.
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


def run_until_signalled_twice(job: Callable[[asyncio.Event, asyncio.Event], Awaitable[T]]) -> T:
    """Run `job(stop, force)` in a new event loop: the first SIGTERM or SIGINT sets `stop`,
    any later one sets `force` (saq's two-phase shutdown: finish, then cut short)."""

    async def runner() -> T:
        stop, force = asyncio.Event(), asyncio.Event()

        def on_signal() -> None:
            (force if stop.is_set() else stop).set()

        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_signal)
        try:
            return await job(stop, force)
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    return asyncio.run(runner())
