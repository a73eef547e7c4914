"""The tests' shared helpers: run the real CLI, hash an address, seed the inbox, steer the sandbox.

The CLI always runs as a subprocess driven by asyncio (never a blocking subprocess.run):
the sandbox fixture serves from the test's own event loop, which must keep turning while
the child process talks to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp

from syncd import links
from syncd.identifiers import normalise
from syncd.sandbox import RunningSandbox

Change = tuple[str, str | None, str]  # (segment_key, identifier, operation)


def cli_env(env: Mapping[str, str]) -> dict[str, str]:
    """The test's settings on top of the process environment, minus any SYNCD_/CRITEO_."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCD_", "CRITEO_"))}
    return {**base, **env}


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str
    elapsed_s: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class Cli:
    """A running `python -m syncd ...`; its output is read all along (pipes never fill)."""

    running: ClassVar[set[Cli]] = set()  # started and not finished yet: see reap()

    def __init__(self, proc: asyncio.subprocess.Process, started: float) -> None:
        self.proc = proc
        self.started = started
        self._io = asyncio.ensure_future(proc.communicate())
        Cli.running.add(self)

    @classmethod
    async def start(cls, env: Mapping[str, str], *args: str) -> Cli:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "syncd",
            *args,
            env=cli_env(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc, time.monotonic())

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def finish(self, limit_s: float = 60.0) -> CliResult:
        """Wait for the exit (killing the process if it takes longer than `limit_s`)."""
        try:
            out, err = await asyncio.wait_for(asyncio.shield(self._io), limit_s)
        except TimeoutError:
            self.proc.kill()
            out, err = await self._io
            Cli.running.discard(self)
            raise AssertionError(
                f"syncd did not exit within {limit_s} s\nstdout:\n{out.decode()}\n"
                f"stderr:\n{err.decode()}"
            ) from None
        Cli.running.discard(self)
        assert self.proc.returncode is not None
        return CliResult(
            self.proc.returncode, out.decode(), err.decode(), time.monotonic() - self.started
        )

    @classmethod
    async def reap(cls) -> None:
        """Kill and wait for every process a failed test left running."""
        for cli in list(cls.running):
            if cli.proc.returncode is None:
                cli.proc.kill()
            await cli._io
            cls.running.discard(cli)


async def run_cli(env: Mapping[str, str], *args: str, limit_s: float = 60.0) -> CliResult:
    """Run one syncd command to completion."""
    return await (await Cli.start(env, *args)).finish(limit_s)


def sha256(text: str) -> str:
    """An address as syncd sends it by default: the hex SHA-256 of its normalised form."""
    return hashlib.sha256(text.encode()).hexdigest()


async def insert_changes(conn: Any, rows: Iterable[Change]) -> None:
    """Append changes to the inbox in the given order (ids follow that order)."""
    await conn.copy_records_to_table(
        "membership_changes",
        schema_name="syncd",
        records=list(rows),
        columns=["segment_key", "identifier", "operation"],
    )


async def insert_generated_changes(
    conn: Any, key: str, count: int, operation: str = "add", *, first: int = 1
) -> None:
    """`count` changes user<first>@example.com ... of one segment key, written in SQL."""
    await conn.execute(
        "INSERT INTO syncd.membership_changes (segment_key, identifier, operation) "
        "SELECT $1, 'user' || g || '@example.com', $3 "
        "FROM generate_series($4::int, $4::int + $2::int - 1) g",
        key,
        count,
        operation,
        first,
    )


async def link_in_process(conn: Any, sandbox: RunningSandbox, key: str, criteo_id: str) -> None:
    """A Retail Media email segment in the sandbox, linked without the CLI (in process)."""
    sandbox.state.add_segment("retail-media", "42", "email", segment_id=criteo_id)
    await links.link(conn, links.Link(key, criteo_id, "email", account_id="42"))


def one_line_error(result: CliResult, code: int, *needles: str) -> str:
    """The exit code, and stderr exactly one `syncd: ...` line holding every needle."""
    assert result.code == code, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result
    assert lines[0].startswith("syncd: "), result
    for needle in needles:
        assert needle in lines[0], result
    assert "Traceback" not in result.output, result
    assert "unexpected error" not in result.output, result
    return lines[0]


def expected_members(
    changes: Iterable[Change], segment_key: str, identifier_type: str = "email"
) -> set[str]:
    """What a segment that started empty holds after the changes, applied one by one."""
    members: set[str] = set()
    for key, raw, operation in changes:
        if key != segment_key:
            continue
        value, reason = normalise(raw, identifier_type)
        if reason is not None:
            continue
        assert value is not None
        if operation == "add":
            members.add(value)
        else:
            members.discard(value)
    return members


async def control(
    sandbox: RunningSandbox, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    """Call the sandbox's /_sandbox/<path> control API; fails the test on an error answer."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"{sandbox.url}/_sandbox/{path}", json=body) as resp,
    ):
        payload = await resp.json()
        assert resp.status < 300, payload
        return payload


async def link_segment(
    env: Mapping[str, str],
    sandbox: RunningSandbox,
    key: str,
    segment_id: str,
    identifier_type: str = "email",
) -> None:
    """Create a Retail Media segment in the sandbox, then `syncd segments link` a key to it."""
    await control(
        sandbox,
        "POST",
        "segments",
        {
            "api": "retail-media",
            "identifier_type": identifier_type,
            "account_id": "42",
            "id": segment_id,
        },
    )
    result = await run_cli(
        env,
        "segments",
        "link",
        key,
        "--segment-id",
        segment_id,
        "--identifier-type",
        identifier_type,
    )
    assert result.code == 0, result
    assert result.stdout.strip() == f"linked {key} -> retail-media segment {segment_id}"


def members(sandbox: RunningSandbox, segment_id: str) -> set[str]:
    return set(sandbox.state.segments[segment_id].members)


async def wait_until(
    condition: Callable[[], Awaitable[bool]], limit_s: float, what: str, every: float = 0.02
) -> None:
    """Poll an async condition until it holds; fail the test after `limit_s` seconds."""
    deadline = time.monotonic() + limit_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit_s} s waiting for {what}")
        await asyncio.sleep(every)
