"""The deployment files agree with each other: compose runs the Procfile's commands."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from worker.processes import procfile_commands

ROOT = Path(__file__).resolve().parent.parent


def _words(command: str | list[str]) -> list[str]:
    words = command if isinstance(command, list) else shlex.split(command)
    if words[:2] == ["sh", "-c"]:
        words = shlex.split(words[2])
    return [w.replace("$$", "$") for w in words]


def test_procfile_names_the_contract_processes() -> None:
    commands = procfile_commands()
    assert {"release", "worker", "beat", "flower", "sandbox"} <= set(commands)
    assert commands["release"] == "roomkeeper migrate"
    assert "--port=${PORT:-5555}" in commands["flower"]
    assert "--task-events" in commands["worker"]


def test_compose_runs_the_procfile_commands_with_healthy_dependencies() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    commands = procfile_commands()
    for name in ("release", "worker", "beat", "flower"):
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
