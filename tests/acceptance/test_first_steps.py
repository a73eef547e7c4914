"""Acceptance: a new user's first steps, as the README and .env.example write them.

`syncd sandbox` runs as a real subprocess here, the way a user starts it, and the
README's "Using it" commands run verbatim against it.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from syncd.cli import build_parser
from syncd.sandbox import InitialSegment, SandboxConfig, SandboxState
from tests.helpers import cli_env, run_cli

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
ANNOUNCE = re.compile(r"^syncd sandbox: .*(http://\S+?)[;,)\s]")


@dataclass
class SandboxProcess:
    """`syncd sandbox ...` in a subprocess; `url` and `announced` come from its stderr line."""

    proc: asyncio.subprocess.Process
    url: str
    announced: str

    async def stop(self) -> str:
        """SIGTERM; the exit code must be 0. Returns everything it wrote."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(self.proc.communicate(), 10)
        assert self.proc.returncode == 0, (out, err)
        return self.announced + out.decode() + err.decode()


async def start_sandbox_process(env: Mapping[str, str], *args: str) -> SandboxProcess:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncd",
        "sandbox",
        *args,
        env=cli_env(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,  # a few log lines: the pipe never fills
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stderr.readline(), 15)).decode()
        match = ANNOUNCE.match(line)
        assert match, f"no 'syncd sandbox: ... http://...' line on stderr: {line!r}"
    except BaseException:
        proc.kill()
        await proc.communicate()
        raise
    return SandboxProcess(proc, match.group(1), line)


@pytest.fixture
async def sandboxes() -> AsyncIterator[list[SandboxProcess]]:
    """Every sandbox process a test starts is killed at its end, whatever happened."""
    started: list[SandboxProcess] = []
    yield started
    for sandbox in started:
        if sandbox.proc.returncode is None:
            sandbox.proc.kill()
            await sandbox.proc.communicate()


async def token_status(url: str, client_id: str, secret: str) -> int:
    form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/oauth2/token", data=form) as resp,
    ):
        return resp.status


async def segment(url: str, segment_id: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/_sandbox/segments/{segment_id}") as resp,
    ):
        return resp.status, await resp.json()


# --- the sandbox takes the user's credentials ----------------------------------------------------


async def test_the_sandbox_accepts_the_credentials_it_is_started_with(
    sandboxes: list[SandboxProcess],
) -> None:
    env = {"CRITEO_CLIENT_ID": "my-app-id", "CRITEO_CLIENT_SECRET": "my-Secret-9d2f"}
    sandbox = await start_sandbox_process(env, "--port", "0")
    sandboxes.append(sandbox)
    assert "my-app-id" in sandbox.announced
    assert await token_status(sandbox.url, "my-app-id", "my-Secret-9d2f") == 200
    assert await token_status(sandbox.url, "sandbox-client", "sandbox-secret") == 401
    assert await token_status(sandbox.url, "my-app-id", "wrong") == 401
    output = await sandbox.stop()
    assert "my-Secret-9d2f" not in output


async def test_without_credentials_set_the_sandbox_keeps_its_defaults(
    sandboxes: list[SandboxProcess],
) -> None:
    sandbox = await start_sandbox_process({}, "--port", "0")
    sandboxes.append(sandbox)
    assert "sandbox-client" in sandbox.announced
    assert await token_status(sandbox.url, "sandbox-client", "sandbox-secret") == 200
    output = await sandbox.stop()
    assert "sandbox-secret" not in output


async def test_the_sandbox_enforces_a_budget_per_app_from_its_flags(
    sandboxes: list[SandboxProcess],
) -> None:
    """`--rate-limit-per-min 2 --rate-limit-mode bucket`: each app (the default one and
    those CRITEO_APPS names, credentials from the environment) has its own two calls."""
    env = {
        "CRITEO_APPS": "brand_b",
        "CRITEO_APP_BRAND_B_CLIENT_ID": "brand-b-id",
        "CRITEO_APP_BRAND_B_CLIENT_SECRET": "brand-b-Secret-77",
    }
    sandbox = await start_sandbox_process(
        env,
        "--port",
        "0",
        "--rate-limit-per-min",
        "2",
        "--rate-limit-mode",
        "bucket",
        "--rate-limit-burst",
        "2",
        "--segment",
        "1",
    )
    sandboxes.append(sandbox)
    path = "/2026-07/retail-media/audience-segments/1/contact-list/add-remove"
    attrs = {"operation": "add", "identifierType": "Email", "identifiers": ["a" * 64]}
    body = {"data": {"type": "AddRemoveContactlist", "attributes": attrs}}
    async with aiohttp.ClientSession() as session:
        statuses: dict[str, list[int]] = {}
        for client_id, secret in (("sandbox-client", "sandbox-secret"), env_pair(env)):
            form = {"grant_type": "client_credentials", "client_id": client_id}
            form["client_secret"] = secret
            async with session.post(f"{sandbox.url}/oauth2/token", data=form) as resp:
                token = (await resp.json())["access_token"]
            statuses[client_id] = []
            for _ in range(3):
                async with session.post(
                    sandbox.url + path, json=body, headers={"Authorization": f"Bearer {token}"}
                ) as resp:
                    statuses[client_id].append(resp.status)
                    assert resp.headers["x-ratelimit-limit"] == "2"
                    assert "Retry-After" not in resp.headers
    assert statuses == {"sandbox-client": [200, 200, 429], "brand-b-id": [200, 200, 429]}
    assert "brand-b-Secret-77" not in await sandbox.stop()


def env_pair(env: Mapping[str, str]) -> tuple[str, str]:
    return env["CRITEO_APP_BRAND_B_CLIENT_ID"], env["CRITEO_APP_BRAND_B_CLIENT_SECRET"]


async def test_the_sandbox_starts_with_the_segments_it_is_given(
    sandboxes: list[SandboxProcess],
) -> None:
    sandbox = await start_sandbox_process(
        {},
        "--port",
        "0",
        "--segment",
        "523103620:retail-media:email",
        "--segment",
        "77:marketing-solutions:phonenumber",
        "--segment",
        "78",
    )
    sandboxes.append(sandbox)
    for segment_id, api, identifier_type in [
        ("523103620", "retail-media", "Email"),
        ("77", "marketing-solutions", "phoneNumber"),
        ("78", "retail-media", "Email"),
    ]:
        status, body = await segment(sandbox.url, segment_id)
        assert status == 200, body
        assert (body["api"], body["identifier_type"]) == (api, identifier_type)
        assert segment_id in sandbox.announced
    await sandbox.stop()


@pytest.mark.parametrize(
    "spec", ["x1:retail-media", "1:tiktok", "1:retail-media:fax", "1:retail-media:email:9", ""]
)
async def test_a_malformed_segment_is_a_usage_error(spec: str) -> None:
    result = await run_cli({}, "sandbox", "--port", "0", "--segment", spec, limit_s=15)
    assert result.code == 2, result
    assert "--segment" in result.stderr, result
    assert "e.g. 523103620:retail-media:email" in result.stderr, result
    assert "Traceback" not in result.output, result


# --- the README's first steps, verbatim ----------------------------------------------------------


def env_example() -> dict[str, str]:
    """The variables `.env.example` sets (what `set -a; . ./.env; set +a` exports)."""
    out = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            out[name] = value
    return out


def using_it_blocks() -> list[tuple[str, str]]:
    """The (language, text) code blocks of the README's "Using it" section, in order."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Using it\n")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"```(sh|sql)\n(.*?)```", section, re.DOTALL)


# Lines the test plays by other means: installing (done), copying and editing .env (the
# test's own database goes in SYNCD_DATABASE_URL), loading it (env_example()).
_DONE_ALREADY = ("pip install", "cp .env.example .env", "set -a; . ./.env; set +a")


async def test_the_readme_first_steps_work_verbatim_against_the_sandbox(
    database_url: str, sandboxes: list[SandboxProcess]
) -> None:
    env = {**env_example(), "SYNCD_DATABASE_URL": database_url}
    default_url = f"http://127.0.0.1:{build_parser_sandbox_port()}"
    ran: list[str] = []
    for language, block in using_it_blocks():
        if language == "sql":
            conn = await asyncpg.connect(database_url)
            try:
                await conn.execute(block)
            finally:
                await conn.close()
            ran.append("sql")
            continue
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if not words or line.startswith(_DONE_ALREADY):
                continue
            if words[0] == "export":
                env |= dict(word.split("=", 1) for word in words[1:])
            elif words[:2] == ["syncd", "sandbox"] and words[-1] == "&":
                # Any free port rather than 8181: other test sessions may run at once.
                sandbox = await start_sandbox_process(env, *words[2:-1], "--port", "0")
                sandboxes.append(sandbox)
                assert env["CRITEO_API_URL"] == default_url, "the README's URL is the default"
                env["CRITEO_API_URL"] = sandbox.url
                assert f"CRITEO_API_URL={sandbox.url}" in sandbox.announced
            else:
                assert words[0] == "syncd", f"a README line this test cannot play: {line!r}"
                result = await run_cli(env, *words[1:])
                assert result.code == 0, (line, result)
            ran.append(" ".join(words[:2]))
    steps = iter(ran)  # these, in this order, among what ran
    for step in ("syncd sandbox", "syncd migrate", "syncd segments", "sql", "syncd sync"):
        assert step in steps, (step, ran)
    status, body = await segment(sandboxes[0].url, "523103620")
    assert status == 200 and body["size"] == 1, body
    output = await sandboxes[0].stop()
    assert env["CRITEO_CLIENT_SECRET"] not in output


def build_parser_sandbox_port() -> int:
    args = build_parser().parse_args(["sandbox"])
    return int(args.port)


def test_env_example_says_what_is_required_and_what_is_optional() -> None:
    text = (ROOT / ".env.example").read_text()
    assert re.search(
        r"SYNCD_DATABASE_URL.*required|required.*SYNCD_DATABASE_URL", text, re.I | re.S
    )
    assert "optional" in text.lower()
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_a_reset_brings_the_initial_segments_back_empty() -> None:
    state = SandboxState(SandboxConfig(segments=(InitialSegment("523103620"),)))
    state.segments["523103620"].members.add("someone")
    state.add_segment("retail-media", "1000", "Email", segment_id="9")
    state.reset()
    assert list(state.segments) == ["523103620"]
    assert state.segments["523103620"].members == set()
