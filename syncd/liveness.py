"""A run's liveness: its advisory lock on a dedicated connection, proven by a heartbeat.

PostgreSQL drops a session's advisory lock when the session ends: when the run's process
dies, but also when its idle connection is closed under a run that goes on
(idle_session_timeout, pg_terminate_backend, a proxy). So the lock alone does not say
that none of a run's requests is in flight. The run therefore

* keeps the connection busy and alive: a heartbeat every `heartbeat_s` writes
  `sync_runs.heartbeat_at` from it, having checked that the lock is still held; the
  connection turns idle_session_timeout off and asks for TCP keepalives;
* stops claiming and sending the moment the lock cannot be proven (the connection closes,
  or a heartbeat fails or does not answer within `heartbeat_s`): `on_lost` is called once;
* is refused every send by the database once its last heartbeat is older than
  `valid_s` (the lease renewal right before each send checks it), whatever its process
  believes: a heartbeat is confirmed or the run stopped within twice heartbeat_s, and
  valid_s = 3 heartbeat_s + 1 s leaves room for a loaded event loop;
* records `takeover_after_s` = valid_s + the HTTP timeout + one more heartbeat_s: after
  that long since its last heartbeat none of its requests can still be in flight, and
  only then may another run take its claimed chunks (syncd.run_is_gone).

A run killed with kill -9 is thus taken over at most `takeover_after_s` after it died:
81 s with the default SYNCD_HTTP_TIMEOUT_S of 60 s, 3 s with 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import asyncpg

from syncd.config import Settings
from syncd.db import connect, query
from syncd.logging import get_logger

log = get_logger(__name__)

MIN_HEARTBEAT_S = 0.2


class RunSlot(Protocol):
    """A daemon run's slot (syncd.daemon.schedule.Slot): its unique key and its window."""

    @property
    def key(self) -> str: ...

    @property
    def window(self) -> datetime: ...


MAX_HEARTBEAT_S = 5.0


@dataclass(frozen=True)
class LivenessTiming:
    heartbeat_s: float  # how often the lock is proven
    valid_s: float  # how long a proof vouches for sends
    takeover_after_s: float  # after the last proof: none of the run's requests in flight

    @classmethod
    def for_settings(cls, settings: Settings) -> LivenessTiming:
        heartbeat = min(MAX_HEARTBEAT_S, max(MIN_HEARTBEAT_S, settings.http_timeout_s / 4))
        # Three periods and a second: a heartbeat waits heartbeat_s and may take as long
        # again to answer, and a loaded event loop adds its own delay (valid = 2 periods
        # made a live run's sends refused on a busy 2-core CI machine).
        valid = 3 * heartbeat + 1.0
        return cls(heartbeat, valid, valid + settings.http_timeout_s + heartbeat)


class RunLock:
    """The dedicated connection that holds one run's liveness lock and proves it."""

    def __init__(self, conn: Any, timing: LivenessTiming) -> None:
        self.conn = conn
        self.timing = timing
        self.run_id: int | None = None
        self.lost: str | None = None
        self._closed = asyncio.Event()  # set when the lock is found lost
        self._closing = False

    @classmethod
    async def open(cls, settings: Settings) -> RunLock:
        conn = await connect(settings)
        try:
            await conn.execute(query("keep_lock_connection_alive"))
        except BaseException:
            await conn.close()
            raise
        lock = cls(conn, LivenessTiming.for_settings(settings))
        conn.add_termination_listener(lambda _: lock._lose("the lock connection was closed"))
        return lock

    async def start_run(self, trigger: str, slot: RunSlot | None = None) -> Any:
        """Insert the run row and take its lock: both become visible together. A daemon
        run of a slot another run has (syncd.daemon.schedule) gets no row: None."""
        timing = (self.timing.valid_s, self.timing.takeover_after_s)
        async with self.conn.transaction():
            if slot is None:
                row = await self.conn.fetchrow(
                    query("start_run"), trigger, socket.gethostname(), os.getpid(), *timing
                )
            else:
                row = await self.conn.fetchrow(
                    query("start_slot_run"),
                    trigger,
                    socket.gethostname(),
                    os.getpid(),
                    *timing,
                    slot.window,
                    slot.key,
                )
                if row is None:
                    return None
            await self.conn.execute(query("hold_run_lock"), row["id"])
        self.run_id = int(row["id"])
        return row

    async def keep(self, on_lost: Callable[[str], None]) -> None:
        """Prove the lock every heartbeat_s until cancelled; once it cannot be proven, call
        `on_lost(reason)` (in the caller's task, so its log lines carry the run's context)
        and return."""
        while self.lost is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self.timing.heartbeat_s)
            if self.lost is None:
                await self._heartbeat()
        on_lost(self.lost)

    async def _heartbeat(self) -> None:
        try:
            held = await self.conn.fetchval(
                query("run_heartbeat"), self.run_id, timeout=self.timing.heartbeat_s
            )
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._lose(f"heartbeat failed: {type(exc).__name__}")
            return
        if held is None:
            self._lose("the lock is no longer held")

    def _lose(self, reason: str) -> None:
        if self._closing or self.lost is not None:
            return
        self.lost = reason
        self._closed.set()

    async def close(self) -> None:
        """End the session (and with it the lock). A lost connection is only dropped:
        closing it politely could wait on a peer that is gone."""
        self._closing = True
        if self.lost is not None:
            self.conn.terminate()
            return
        try:
            await self.conn.close(timeout=self.timing.heartbeat_s)
        except (TimeoutError, OSError, asyncpg.InterfaceError):
            self.conn.terminate()
