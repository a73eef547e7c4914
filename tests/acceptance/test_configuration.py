"""Acceptance: configuration and usage mistakes, and an unreachable database, through the CLI.

A mistake in the settings or the command line is one `syncd: ...` line and exit 2, and
never echoes a password; a database that does not answer is "unavailable, try again",
exit 1, because the same command may well succeed a minute later.
"""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from syncd.sandbox import RunningSandbox
from tests.helpers import insert_changes, link_segment, one_line_error, run_cli

pytestmark = pytest.mark.timeout(60)

README = Path(__file__).resolve().parents[2] / "README.md"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- the database: unavailable (exit 1) versus misconfigured (exit 2) -------------------------


@pytest.mark.parametrize("command", ["status", "migrate", "sync"])
async def test_an_unreachable_database_is_unavailable_exit_1(
    env: dict[str, str], command: str
) -> None:
    url = f"postgresql://u:hunter2pw@127.0.0.1:{closed_port()}/crm"
    result = await run_cli({**env, "SYNCD_DATABASE_URL": url}, command)
    line = one_line_error(result, 1, "database", "unavailable", "try again")
    assert "SYNCD_DATABASE_URL" not in line  # not a settings problem
    assert "hunter2pw" not in result.output


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pa55/w0rd@127.0.0.1:5432/crm",  # an unencoded '/' in the password
        "postgresql://u:pa55#w0rd@127.0.0.1:5432/crm",
        "postgresql://u:pa55w0rd@127.0.0.1:99999/crm",  # a port out of range
    ],
)
async def test_a_malformed_database_url_is_exit_2_without_its_password(
    env: dict[str, str], url: str
) -> None:
    result = await run_cli({**env, "SYNCD_DATABASE_URL": url}, "status")
    one_line_error(result, 2, "SYNCD_DATABASE_URL")
    assert "pa55" not in result.output and "w0rd" not in result.output, result


async def test_a_database_that_does_not_exist_is_configuration(database_url: str) -> None:
    missing = urlunsplit(urlsplit(database_url)._replace(path="/no_such_database"))
    result = await run_cli({"SYNCD_DATABASE_URL": missing}, "status")
    one_line_error(result, 2, "SYNCD_DATABASE_URL", "no_such_database")


# --- privileges -----------------------------------------------------------------------------------


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def readme_grants(role: str) -> list[str]:
    """The README's "Database privileges" statements for `role` (syncd_app, crm_writer)."""
    blocks = re.findall(r"```sql\n(.*?)```", readme_section("Database privileges"), re.DOTALL)
    statements = [s.strip() for block in blocks for s in block.split(";")]
    mine = [s for s in statements if s.endswith(f" TO {role}")]
    assert mine, f"no grants to {role} in the README"
    return mine


@pytest.fixture
async def make_role(database_url: str) -> AsyncIterator[Callable[[], Awaitable[Role]]]:
    """Makes new login roles with no privileges at all (not even CONNECT through PUBLIC)."""
    admin = await asyncpg.connect(database_url)
    database = urlsplit(database_url).path[1:]
    await admin.execute(f"REVOKE ALL ON DATABASE {database} FROM PUBLIC")
    made: list[str] = []

    async def make() -> Role:
        name = f"syncd_role_{uuid.uuid4().hex[:8]}"
        await admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'role-pw-7c1e'")
        made.append(name)
        parts = urlsplit(database_url)
        netloc = f"{name}:role-pw-7c1e@{parts.netloc.rpartition('@')[2]}"
        return Role(name, urlunsplit(parts._replace(netloc=netloc)), database, admin)

    try:
        yield make
    finally:
        for name in made:
            await admin.execute(f"DROP OWNED BY {name}")
            await admin.execute(f"DROP ROLE {name}")
        await admin.close()


@dataclass(frozen=True)
class Role:
    name: str
    url: str  # logs in as this role
    database: str
    admin: Any

    async def grant(self, statements: list[str], as_role: str = "syncd_app") -> None:
        """Run statements written for role `as_role` and database `crm` on this role's own."""
        for written in statements:
            statement = written.replace(f" TO {as_role}", f" TO {self.name}")
            statement = statement.replace(f" FROM {as_role}", f" FROM {self.name}")
            await self.admin.execute(statement.replace("DATABASE crm", f"DATABASE {self.database}"))


async def test_the_readme_privileges_are_enough_to_write_the_inbox_and_sync(
    env: dict[str, str],
    sandbox: RunningSandbox,
    make_role: Callable[[], Awaitable[Role]],
) -> None:
    app, crm = await make_role(), await make_role()
    await app.grant(readme_grants("syncd_app"))
    await crm.grant(readme_grants("crm_writer"), as_role="crm_writer")
    await crm.grant(["GRANT CONNECT ON DATABASE crm TO syncd_app"])
    app_env = {**env, "SYNCD_DATABASE_URL": app.url}
    await link_segment(app_env, sandbox, "vip", "1001")
    crm_conn = await asyncpg.connect(crm.url)
    try:
        await insert_changes(crm_conn, [("vip", "a@x.com", "add"), ("vip", "b@x.com", "add")])
    finally:
        await crm_conn.close()
    result = await run_cli(app_env, "sync")
    assert result.code == 0, result
    assert len(sandbox.state.segments["1001"].members) == 2
    result = await run_cli(app_env, "status")
    assert result.code == 0, result


async def test_a_role_that_cannot_connect_is_named_exit_2(
    env: dict[str, str], make_role: Callable[[], Awaitable[Role]]
) -> None:
    role = await make_role()
    result = await run_cli({**env, "SYNCD_DATABASE_URL": role.url}, "status")
    one_line_error(result, 2, "SYNCD_DATABASE_URL", "permission denied for database", "privilege")
    assert "role-pw" not in result.output


@pytest.mark.parametrize(
    ("command", "revoked", "needle"),
    [
        ("status", None, "permission denied for schema syncd"),
        ("sync", "UPDATE ON syncd.chunks", "permission denied for table chunks"),
        ("sync", "INSERT ON syncd.sync_runs", "permission denied for table sync_runs"),
    ],
)
async def test_a_role_without_the_privileges_syncd_needs_is_named_exit_2(
    env: dict[str, str],
    conn: Any,
    sandbox: RunningSandbox,
    make_role: Callable[[], Awaitable[Role]],
    command: str,
    revoked: str | None,
    needle: str,
) -> None:
    role = await make_role()
    if revoked is None:  # connect, and nothing else
        await role.grant(["GRANT CONNECT ON DATABASE crm TO syncd_app"])
    else:
        await role.grant([*readme_grants("syncd_app"), f"REVOKE {revoked} FROM syncd_app"])
    await link_segment(env, sandbox, "vip", "1001")
    await insert_changes(conn, [("vip", "a@x.com", "add")])
    result = await run_cli({**env, "SYNCD_DATABASE_URL": role.url}, command)
    one_line_error(result, 2, needle, "Database privileges")


# --- usage ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("runs", ["-1", "1_0", "\uff13"])
async def test_status_refuses_a_negative_or_odd_run_count(env: dict[str, str], runs: str) -> None:
    result = await run_cli(env, "status", "--runs", runs)
    assert result.code == 2, result
    assert "--runs" in result.stderr, result
    assert "Traceback" not in result.output, result


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"CRITEO_API_URL": "http://api.criteo.com"}, "https"),
        ({"CRITEO_API_URL": "https://me:hunter2pw@api.criteo.com"}, "CRITEO_CLIENT_SECRET"),
        ({"CRITEO_API_URL": "https://me:hun/ter2pw@api.criteo.com"}, "CRITEO_CLIENT_SECRET"),
        ({"CRITEO_API_URL": "https://api.criteo.com:99999"}, "port"),
        ({"SYNCD_CONCURRENCY": "1_0"}, "SYNCD_CONCURRENCY"),
        ({"SYNCD_CONCURRENCY": "\uff14"}, "SYNCD_CONCURRENCY"),
        ({"SYNCD_HTTP_TIMEOUT_S": "nan"}, "SYNCD_HTTP_TIMEOUT_S"),
    ],
)
async def test_bad_settings_are_one_line_exit_2_naming_the_variable(
    env: dict[str, str], change: dict[str, str], needle: str
) -> None:
    result = await run_cli({**env, **change}, "sync")
    line = one_line_error(result, 2, needle, next(iter(change)))
    assert result.stdout == "", result
    assert "hunter2pw" not in result.output and "ter2pw" not in line, result
