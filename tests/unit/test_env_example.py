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
# The variables of each app CRITEO_APPS names, as config.py quotes them ("<NAME>" stands
# for the app's name upper-cased), and as .env.example shows them for an example app.
_APP_TEMPLATE = re.compile(r'"(CRITEO_APP_<NAME>_[A-Z0-9_]+)"')
_EXAMPLE_APP = re.compile(r"^#? ?CRITEO_APPS=([a-z0-9_]+)", re.MULTILINE)


def test_every_setting_is_in_env_example_and_nothing_else() -> None:
    config = (ROOT / "syncd" / "config.py").read_text()
    example = (ROOT / ".env.example").read_text()
    read = set(_READ.findall(config))
    # Each per-app template, filled in with the app .env.example shows as an example.
    apps = _EXAMPLE_APP.findall(example)
    assert apps, ".env.example shows no example CRITEO_APPS=name"
    templates = set(_APP_TEMPLATE.findall(config))
    assert templates, "no per-app variables found in config.py: the pattern is stale"
    read |= {t.replace("<NAME>", apps[0].upper()) for t in templates}
    documented = set(_DOCUMENTED.findall(example)) - _TEST_ONLY
    assert read, "no variables found in config.py: the pattern is stale"
    assert sorted(read - documented) == [], "read by Settings, missing from .env.example"
    assert sorted(documented - read) == [], "in .env.example, never read by Settings"
