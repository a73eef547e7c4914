"""deploy/ agrees with the code: the Dockerfile, the systemd units and the Kubernetes manifests.

No container engine or Kubernetes runs on these machines, so the files are parsed, not run:
each setting that must match the code (the port, the shutdown grace, the variables, the
commands) is compared with what the code says.
"""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from syncd.cli import build_parser
from syncd.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# The variables that hold credentials: the Secret, and only the Secret, carries them.
CREDENTIALS = {"SYNCD_DATABASE_URL", "CRITEO_CLIENT_ID", "CRITEO_CLIENT_SECRET"}


def defaults() -> Settings:
    """What the code uses when a variable is unset (only the database URL is required)."""
    return Settings.from_env({"SYNCD_DATABASE_URL": "postgresql://u@h/db"}, need_criteo=False)


def real_commands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def assert_syncd_command(argv: list[str], expected: str) -> None:
    """argv runs `syncd <expected>` (any path to the script), and that command exists."""
    assert Path(argv[0]).name == "syncd", argv
    assert argv[1:] == [expected], argv
    assert expected in real_commands(), f"`syncd {expected}` is no command"


def documented_variables() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#? ?((?:SYNCD|CRITEO)_[A-Z0-9_]+)=", text, re.MULTILINE))


def test_the_credentials_are_the_secret_settings() -> None:
    secret_fields = {f.name for f in fields(Settings) if f.type == "Secret"}
    env_names = {
        n if n.startswith("CRITEO_") else f"SYNCD_{n}" for n in map(str.upper, secret_fields)
    }
    assert env_names, "no Secret-typed field in Settings: the check is stale"
    assert env_names <= CREDENTIALS <= documented_variables()


def test_every_subpackage_ships_in_the_wheel_the_image_installs() -> None:
    # The image installs syncd from a wheel, not editable: a package missing from
    # pyproject's list is missing from the container (syncd.daemon once was).
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "syncd").rglob("__init__.py")
    }
    assert on_disk - listed == set(), "packages pyproject.toml does not ship"


# -- Dockerfile ---------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    parsed = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]
    last_from = max(i for i, (op, _) in enumerate(parsed) if op == "FROM")
    return parsed[last_from:]


def instruction(stage: list[tuple[str, str]], name: str) -> str:
    found = [args for op, args in stage if op == name]
    assert found, f"no {name} in the Dockerfile's final stage"
    return found[-1]


def exec_form(args: str) -> list[str]:
    value = yaml.safe_load(args)  # a JSON array is YAML too
    assert isinstance(value, list), f"not exec form (no shell, signals reach syncd): {args}"
    return [str(v) for v in value]


def test_dockerfile_runs_the_daemon_as_a_non_root_user_on_a_slim_base() -> None:
    stage = dockerfile()
    assert re.fullmatch(r"python:3\.1[1-9][.\d]*-slim(-\w+)?( AS \w+)?", instruction(stage, "FROM"))
    user = instruction(stage, "USER").split(":")[0]
    assert user not in {"root", "0"}
    argv = exec_form(instruction(stage, "ENTRYPOINT")) + exec_form(instruction(stage, "CMD"))
    assert_syncd_command(argv, "run")
    assert instruction(stage, "STOPSIGNAL") == "SIGTERM"
    assert instruction(stage, "EXPOSE").split() == [str(defaults().http_port)]


def test_dockerfile_healthcheck_asks_healthz_with_urllib_on_the_default_port() -> None:
    check = instruction(dockerfile(), "HEALTHCHECK")
    assert "urllib.request" in check and "/healthz" in check
    assert "curl" not in check and "wget" not in check  # slim has neither
    assert f"'{defaults().http_port}'" in check  # the fallback when SYNCD_HTTP_PORT is unset


# -- systemd ------------------------------------------------------------------------------


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60}
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert found and found.group(2) in units, value
    return float(found.group(1)) * units[found.group(2)]


def test_systemd_service_restarts_stops_gracefully_and_is_hardened() -> None:
    service = unit("syncd.service")["Service"]
    assert_syncd_command(shlex.split(service["ExecStart"][0]), "run")
    assert_syncd_command(shlex.split(service["ExecStartPre"][0]), "migrate")
    assert service["Restart"] == ["on-failure"]
    assert service["EnvironmentFile"] == ["/etc/syncd/syncd.env"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert seconds(service["TimeoutStopSec"][0]) > defaults().shutdown_grace_s
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service.get("DynamicUser") == ["yes"] or service.get("User") == ["syncd"]


def test_systemd_one_shot_timer_alternative_runs_real_commands() -> None:
    service = unit("syncd-sync.service")["Service"]
    assert_syncd_command(shlex.split(service["ExecStart"][0]), "sync")
    assert_syncd_command(shlex.split(service["ExecStartPre"][0]), "migrate")
    assert service["EnvironmentFile"] == ["/etc/syncd/syncd.env"]
    assert unit("syncd-sync.timer")["Timer"]["OnCalendar"]


# -- Kubernetes ---------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """Every object in deploy/kubernetes, by kind (one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in found, f"two {doc['kind']} objects"
                found[doc["kind"]] = doc
    assert {"Deployment", "Secret", "ConfigMap", "Job"} <= set(found)
    return found


def pod_of(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def container_of(obj: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_of(obj)["containers"]
    return dict(container)


def argv_of(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def env_sources(container: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(ConfigMap names, Secret names) the container's environment comes from."""
    refs = container.get("envFrom", [])
    maps = {r["configMapRef"]["name"] for r in refs if "configMapRef" in r}
    secrets = {r["secretRef"]["name"] for r in refs if "secretRef" in r}
    return maps, secrets


def test_kubernetes_secret_holds_exactly_the_credentials() -> None:
    secret = manifests()["Secret"]
    values = secret.get("stringData") or secret.get("data") or {}
    assert set(values) == CREDENTIALS


def test_kubernetes_configmap_holds_documented_settings_and_no_credentials() -> None:
    data = manifests()["ConfigMap"]["data"]
    assert set(data) <= documented_variables() - CREDENTIALS
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    env = {"SYNCD_DATABASE_URL": "postgresql://u@h/db", **data}
    Settings.from_env(env, need_criteo=False)  # the values are ones syncd accepts


def test_kubernetes_deployment_probes_grace_and_security_agree_with_the_code() -> None:
    objs = manifests()
    deployment, port = objs["Deployment"], defaults().http_port
    assert deployment["spec"]["replicas"] == 2
    pod, container = pod_of(deployment), container_of(deployment)
    assert_syncd_command(argv_of(container), "run")
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert port in ports.values()
    port = int(objs["ConfigMap"]["data"].get("SYNCD_HTTP_PORT", port))
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == port, probe  # a name or a number
    grace = float(objs["ConfigMap"]["data"].get("SYNCD_SHUTDOWN_GRACE_S", 0))
    assert pod["terminationGracePeriodSeconds"] > max(grace, defaults().shutdown_grace_s)
    scrape = deployment["spec"]["template"]["metadata"].get("annotations", {})
    assert scrape.get("prometheus.io/port", str(port)) == str(port)
    assert env_sources(container) == (
        {objs["ConfigMap"]["metadata"]["name"]},
        {objs["Secret"]["metadata"]["name"]},
    )
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"requests", "limits"} <= set(container["resources"])


def test_kubernetes_migration_job_runs_migrate_with_the_same_settings() -> None:
    objs = manifests()
    job = objs["Job"]
    container = container_of(job)
    assert_syncd_command(argv_of(container), "migrate")
    assert pod_of(job)["restartPolicy"] in {"Never", "OnFailure"}
    assert env_sources(container) == env_sources(container_of(objs["Deployment"]))
    assert container["image"] == container_of(objs["Deployment"])["image"]
    assert pod_of(job)["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_kubernetes_manifests_match_the_api_schema(version: str) -> None:
    # Strict: an unknown or misspelt field (a probe's "initialDelay") fails instead of
    # being dropped silently by the API server.
    errors = []
    for kind, obj in manifests().items():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{kind}: {error.message}")
    assert errors == []


@pytest.mark.parametrize("name", ["Dockerfile", "kubernetes/deployment.yaml"])
def test_syncd_check_is_offered_as_an_exec_probe(name: str) -> None:
    assert "syncd check" in (DEPLOY / name).read_text()
