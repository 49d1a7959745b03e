"""The deployment files agree with each other: compose runs the Procfile's commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from worker.devtools.processes import procfile_commands

ROOT = Path(__file__).resolve().parents[2]


def _words(command: str | list[str]) -> list[str]:
    words = command if isinstance(command, list) else shlex.split(command)
    if words[:2] == ["sh", "-c"]:
        words = shlex.split(words[2])
    return [w.replace("$$", "$") for w in words]


def test_procfile_names_the_contract_processes() -> None:
    commands = procfile_commands()
    assert {"release", "worker", "beat", "flower", "web", "sandbox"} <= set(commands)
    assert commands["web"] == "roomkeeper web"  # its port comes from ROOMKEEPER_WEB_PORT
    assert commands["release"] == "roomkeeper migrate"
    assert "--port=${PORT:-5555}" in commands["flower"]
    assert "--task-events" in commands["worker"]


def test_compose_runs_the_procfile_commands_with_healthy_dependencies() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    commands = procfile_commands()
    for name in ("release", "worker", "beat", "flower", "web"):
        expected = shlex.split(commands[name])
        actual = _words(services[name]["command"])
        assert actual == expected, name
        conditions = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        assert conditions["redis"] == conditions["postgres"] == "service_healthy"
        if name != "release":
            assert conditions["release"] == "service_completed_successfully"
    assert _words(services["sandbox"]["command"])[:2] == ["roomkeeper", "sandbox"]
    for name in ("redis", "postgres"):
        assert services[name]["healthcheck"]["test"]
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]


def test_flower_never_serves_anonymously_from_the_procfile_or_compose() -> None:
    # The Procfile's Flower goes through the guard (a bare `celery flower` would serve anyone).
    assert shlex.split(procfile_commands()["flower"])[:2] == ["roomkeeper", "flower"]
    flower = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["flower"]
    # Compose either insists on credentials (`${VAR:?message}` stops `docker compose` when VAR is
    # unset or empty) or publishes the port on the host's loopback only.
    published = [str(p) for p in flower["ports"]]
    loopback_only = all(p.startswith("127.0.0.1:") for p in published)
    value = str(flower["environment"].get("FLOWER_BASIC_AUTH") or "")  # `FLOWER_BASIC_AUTH:` is None
    required = re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]*FLOWER_BASIC_AUTH[^}]*\}", value)
    assert required or loopback_only, flower


def test_compose_serves_web_and_prometheus_scrapes_its_metrics() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    web = services["web"]
    assert "8000:8000" in [str(p) for p in web["ports"]]
    assert "/healthz" in " ".join(web["healthcheck"]["test"])
    assert web["environment"] == services["worker"]["environment"]  # the same settings as the worker
    prometheus = services["prometheus"]
    assert str(prometheus["image"]).startswith("prom/prometheus")
    mounted = {str(v).split(":")[0]: str(v).split(":")[1] for v in prometheus["volumes"]}
    assert mounted["./config/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "roomkeeper"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["web:8000"]
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "15s"
