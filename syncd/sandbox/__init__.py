"""The sandbox: a Criteo-compatible audience API on loopback, for tests, the demo and the
benchmark.

It serves the contact-list calls syncd makes (OAuth2 client credentials, add/remove,
clear, statistics, create and search, for Retail Media and Marketing Solutions), checks
requests the way Criteo does, and keeps real member sets so a test can check what a
segment ends up holding. Faults are injected on demand under ``/_sandbox/`` (no auth)
or at random from :class:`SandboxConfig`.

The sandbox imports nothing from the rest of syncd (a test holds it to that): it stands
for Criteo, so it must not share syncd's idea of what a valid identifier is.
"""

from __future__ import annotations

from syncd.sandbox.app import RunningSandbox, create_app, serve, start_sandbox
from syncd.sandbox.config import InitialSegment, SandboxConfig
from syncd.sandbox.state import SANDBOX_STATE, SandboxState

__all__ = [
    "SANDBOX_STATE",
    "InitialSegment",
    "RunningSandbox",
    "SandboxConfig",
    "SandboxState",
    "create_app",
    "serve",
    "start_sandbox",
]
