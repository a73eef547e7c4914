"""The README names only metrics that /metrics really exposes."""

from __future__ import annotations

import re
from pathlib import Path

from syncd.daemon.metrics import REGISTRY

README = Path(__file__).resolve().parents[2] / "README.md"
SUFFIXES = ("", "_total", "_count", "_sum", "_bucket")


def test_every_metric_the_readme_names_is_exposed() -> None:
    exposed = {f.name + suffix for f in REGISTRY.collect() for suffix in SUFFIXES}
    named = set(re.findall(r"`(syncd_[a-z_]+)", README.read_text(encoding="utf-8")))
    assert named, "the README names no metric"
    assert named - exposed == set()
