"""The test sessions' PostgreSQL clean-up: a killed session's server is stopped and its
folder removed; a running session's folder is never touched."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import pg_leftovers

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def fake_server(data: Path, processes: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """A process started on `data` (its path on the command line, as a postmaster's is),
    written into data/postmaster.pid."""
    data.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(data)],
        stderr=subprocess.DEVNULL,
    )
    processes.append(proc)
    (data / "postmaster.pid").write_text(f"{proc.pid}\n{data}\n")
    return proc


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_sessions_server_is_stopped_and_its_folder_removed(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    root = tmp_path / f"{pg_leftovers.PREFIX}killed"
    server = fake_server(root / "data", processes)
    (root / pg_leftovers.OWNER_FILE).write_text(f"{dead_pid()} 12345\n")
    assert pg_leftovers.clean_leftovers(tmp_path) == [root]
    assert server.wait(10) is not None  # stopped
    assert not root.exists()


def test_an_older_sessions_folder_is_judged_by_the_servers_own_pid_list(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    root = tmp_path / f"{pg_leftovers.PREFIX}older"
    server = fake_server(root / "data", processes)
    (root / "data" / ".handle_pids.json").write_text(f"[{dead_pid()}]")
    assert pg_leftovers.clean_leftovers(tmp_path) == [root]
    assert server.wait(10) is not None


def test_a_running_sessions_folder_is_left_alone(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    mine = tmp_path / f"{pg_leftovers.PREFIX}mine"
    server = fake_server(mine / "data", processes)
    pg_leftovers.claim(mine)  # this process: alive
    theirs = tmp_path / f"{pg_leftovers.PREFIX}theirs"
    other = fake_server(theirs / "data", processes)
    (theirs / "data" / ".handle_pids.json").write_text(f"[{dead_pid()}, {os.getpid()}]")
    assert pg_leftovers.clean_leftovers(tmp_path) == []
    assert server.poll() is None and other.poll() is None
    assert (mine / "data").is_dir() and (theirs / "data").is_dir()


def test_a_reused_pid_is_not_signalled(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    root = tmp_path / f"{pg_leftovers.PREFIX}stale"
    (root / "data").mkdir(parents=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    processes.append(bystander)
    (root / "data" / "postmaster.pid").write_text(f"{bystander.pid}\n")
    (root / pg_leftovers.OWNER_FILE).write_text(f"{dead_pid()} 1\n")
    assert pg_leftovers.clean_leftovers(tmp_path) == [root]
    assert bystander.poll() is None


def test_an_unowned_empty_folder_goes_only_once_old(tmp_path: Path) -> None:
    old = tmp_path / f"{pg_leftovers.PREFIX}old"
    young = tmp_path / f"{pg_leftovers.PREFIX}young"
    old.mkdir()
    young.mkdir()
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert pg_leftovers.clean_leftovers(tmp_path) == [old]
    assert young.is_dir()
