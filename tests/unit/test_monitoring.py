"""The shipped monitoring agrees with the metrics (deploy/monitoring/ and syncd/daemon/metrics.py).

Every metric an alert rule or a dashboard query names must be one `/metrics` really exposes,
or the alert never fires and the panel stays empty without anyone noticing. The rules' own
behaviour (firing and quiet) is tested by `promtool test rules` in `make monitoring`; here we
only check that each rule has both kinds of case there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from syncd.config import Settings
from syncd.daemon.metrics import REGISTRY

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"

# PromQL words that look like metric names but are not: binary-operator keywords, modifiers
# and the two float literals. Functions are recognised by the "(" that follows them.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
KEYWORDS |= {"group_left", "group_right", "inf", "nan"}
_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_NAME_MATCHER = re.compile(r"""__name__\s*=~?\s*["']([A-Za-z_:][\w:]*)["']""")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
# A name not glued to a number or another name (1e3, 0x1f), maybe followed by "(".
_WORD = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana query with $variables) selects."""
    names = set(_NAME_MATCHER.findall(expr))  # {__name__="x"}
    text = _STRING.sub('""', expr)  # label values, label_replace arguments
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers (strings already gone)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables outside brackets
    text = _GROUPING.sub(" ", text)  # label lists after by/without/on/ignoring/group_*
    text = re.sub(r"\boffset\s+-?\w+", " ", text, flags=re.IGNORECASE)
    for match in _WORD.finditer(text):
        word, call = match.groups()
        if call or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def _sample_names(name: str, kind: str) -> set[str]:
    """What prometheus-client exposes for a family of this type: `_total`, `_bucket`, ..."""
    registry = CollectorRegistry()
    kinds: dict[str, Any] = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
    kinds[kind](name, "probe", ["label"], registry=registry).labels("x")
    return {s.name for family in registry.collect() for s in family.samples}


def exposed_names() -> set[str]:
    """Every sample name REGISTRY exposes, labelled families included before first use."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names |= {s.name for s in family.samples}
        if not family.samples:  # a labelled metric shows nothing until a child exists
            names |= _sample_names(family.name, family.type)
    return names


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return loaded


def dashboard_queries() -> list[str]:
    """Every PromQL the dashboard runs: panel targets and the metric of label_values()."""
    board = dashboard()
    panels = [*board["panels"]]
    panels += [inner for p in board["panels"] for inner in p.get("panels", [])]
    queries = [t["expr"] for p in panels for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        raw = variable["query"]
        text = raw["query"] if isinstance(raw, dict) else raw
        found = re.fullmatch(r"\s*label_values\(\s*(?:(.+),)?\s*\w+\s*\)\s*", text)
        assert found, f"variable {variable['name']}: unrecognised query {text!r}"
        queries += [found.group(1)] if found.group(1) else []
    return queries


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum by (app, le) (rate(a_bucket{job=~"$job", app="x"}[5m]))', {"a_bucket"}),
        ("a / on(instance) group_left(version) b", {"a", "b"}),
        ("x > bool 3 and y unless z or w offset 5m", {"x", "y", "z", "w"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
        ("sum without (instance) (m) * 1e3 + 0x1f", {"m"}),
        ("max_over_time(q[1d:5m]) - time()", {"q"}),
        ('count(up{job="a}b"} == 0) > Inf', {"up"}),
        ('{__name__="named", job="x"}', {"named"}),
        ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[$__rate_interval])))", {"h_bucket"}),
        ("min by (version) (s) - time() < 30 * 86400", {"s"}),
        ("ns:recorded:rate5m{a='b'} > 0", {"ns:recorded:rate5m"}),
    ],
)
def test_metric_names_skip_functions_labels_keywords_and_numbers(
    expr: str, expected: set[str]
) -> None:
    assert metric_names(expr) == expected


def test_exposed_names_are_samples_not_families() -> None:
    names = exposed_names()
    assert {"syncd_chunks_pushed_total", "syncd_request_duration_seconds_bucket"} <= names
    assert {"syncd_chunks_failed", "process_resident_memory_bytes"} <= names
    assert "syncd_chunks_pushed" not in names  # a counter is exposed with _total only


def test_every_alert_rule_names_only_exposed_metrics() -> None:
    exposed = exposed_names()
    for rule in alert_rules():
        used = metric_names(rule["expr"])
        assert used, f"{rule['alert']}: no metric found in its expression"
        assert used <= exposed, f"{rule['alert']}: not exposed: {sorted(used - exposed)}"


def test_every_dashboard_query_names_only_exposed_metrics() -> None:
    exposed = exposed_names()
    for query in dashboard_queries():
        used = metric_names(query)
        assert used, f"no metric found in {query!r}"
        assert used <= exposed, f"not exposed: {sorted(used - exposed)} in {query!r}"


def test_the_dashboard_shows_every_syncd_metric_and_the_memory() -> None:
    used = set().union(*(metric_names(q) for q in dashboard_queries()))
    families = {f.name for f in REGISTRY.collect() if f.name.startswith("syncd_")}
    shown = {family for family in families if any(n.startswith(family) for n in used)}
    assert families - shown == set(), "syncd metrics with no panel"
    assert "process_resident_memory_bytes" in used


def test_every_alert_tells_the_operator_what_to_do() -> None:
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules), "two rules with one name"
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 80, rule["alert"]


def test_every_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    suite = yaml.safe_load((MONITORING / "alerts.test.yml").read_text())
    assert suite["rule_files"] == ["alerts.yml"]
    cases = [case for test in suite["tests"] for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case.get("exp_alerts") for case in mine), f"{rule['alert']} never fires"
        assert any(not case.get("exp_alerts") for case in mine), f"{rule['alert']} never quiet"


def test_the_readme_lists_every_alert() -> None:
    readme = (MONITORING.parents[1] / "README.md").read_text()
    section = readme.split("## Deploy, monitor and alert", 1)[-1].split("\n## ", 1)[0]
    missing = [r["alert"] for r in alert_rules() if r["alert"] not in section]
    assert missing == [], "alerts the README's deploy section does not describe"


def test_the_example_prometheus_config_scrapes_the_default_port_and_loads_the_rules() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    settings = Settings.from_env({"SYNCD_DATABASE_URL": "postgresql://u@h/db"}, need_criteo=False)
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets and all(t.endswith(f":{settings.http_port}") for t in targets)
