"""`python -m syncd` is the same as the `syncd` command."""

from __future__ import annotations

from syncd.cli import main

raise SystemExit(main())
