"""`.env.example` documents every variable Settings reads, and nothing it does not."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A variable name quoted in config.py: "SYNCD_X" or "CRITEO_X".
_READ = re.compile(r'"((?:SYNCD|CRITEO)_[A-Z0-9_]+)"')
# A variable set or shown commented out in .env.example: `NAME=` or `# NAME=`.
_DOCUMENTED = re.compile(r"^#? ?((?:SYNCD|CRITEO)_[A-Z0-9_]+)=", re.MULTILINE)
_TEST_ONLY = {"SYNCD_TEST_DATABASE_URL"}


def test_every_setting_is_in_env_example_and_nothing_else() -> None:
    read = set(_READ.findall((ROOT / "syncd" / "config.py").read_text()))
    documented = set(_DOCUMENTED.findall((ROOT / ".env.example").read_text())) - _TEST_ONLY
    assert read, "no variables found in config.py: the pattern is stale"
    assert sorted(read - documented) == [], "read by Settings, missing from .env.example"
    assert sorted(documented - read) == [], "in .env.example, never read by Settings"
