"""Tests for the settings (CONTRACT §3) and the Celery configuration derived from them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from config.celery import beat_schedule, celery_config
from config.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
SANDBOX_URL = "http://127.0.0.1:8088/v1"
SECRET_KEY = "wb-live-9f2c7e1a4b6d8035"

CONTRACT_VARIABLES = (
    "WHEREBY_API_KEY",
    "WHEREBY_API_URL",
    "ROOMKEEPER_BROKER_URL",
    "ROOMKEEPER_RESULT_BACKEND",
    "ROOMKEEPER_DATABASE_URL",
    "ROOMKEEPER_QUEUE",
    "ROOMKEEPER_CREATE_LEAD_SECONDS",
    "ROOMKEEPER_DELETE_GRACE_SECONDS",
    "ROOMKEEPER_DISPATCH_INTERVAL_SECONDS",
    "ROOMKEEPER_RECONCILE_INTERVAL_SECONDS",
    "ROOMKEEPER_API_POINTS_PER_MINUTE",
    "ROOMKEEPER_ROOM_PREFIX",
    "FLOWER_BASIC_AUTH",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting from the test process (conftest, other tests, the shell) leaks into these cases."""
    for name in list(os.environ):
        if name.upper().startswith("ROOMKEEPER_"):
            monkeypatch.delenv(name, raising=False)
    for name in CONTRACT_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def sandbox_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point at a local sandbox, so no API key is needed and other variables can be tested alone."""
    monkeypatch.setenv("WHEREBY_API_URL", SANDBOX_URL)


def names_variable(message: str, variable: str) -> bool:
    """The message names exactly this variable (not, say, a made-up ROOMKEEPER_-prefixed variant)."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(variable)}(?![A-Za-z0-9_])", message) is not None


def settings_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    return str(caught.value)


# --------------------------------------------------------------------------------------------
# Defaults and reading the environment.


def test_every_contract_variable_has_its_documented_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHEREBY_API_KEY", SECRET_KEY)
    settings = load_settings()
    assert settings.whereby_api_url == "https://api.whereby.dev/v1"
    assert settings.broker_url == "redis://localhost:6379/0"
    assert settings.result_backend is None
    assert settings.backend_url == "redis://localhost:6379/0"
    assert settings.database_url == "sqlite:///var/roomkeeper.db"
    assert settings.queue == "rooms"
    assert settings.create_lead_seconds == 900
    assert settings.delete_grace_seconds == 0
    assert settings.dispatch_interval_seconds == 15
    assert settings.reconcile_interval_seconds == 300
    assert settings.api_points_per_minute == 100
    assert settings.room_prefix == "rk"
    assert settings.flower_basic_auth is None


@pytest.mark.parametrize(
    ("variable", "value", "attribute", "expected"),
    [
        ("WHEREBY_API_KEY", SECRET_KEY, "api_key", SECRET_KEY),
        ("WHEREBY_API_URL", "http://127.0.0.1:8088/v1", "whereby_api_url", "http://127.0.0.1:8088/v1"),
        ("WHEREBY_API_URL", "http://127.0.0.1:8088/v1/", "whereby_api_url", "http://127.0.0.1:8088/v1"),
        (
            "ROOMKEEPER_BROKER_URL",
            "redis://redis.internal:6380/3",
            "broker_url",
            "redis://redis.internal:6380/3",
        ),
        (
            "ROOMKEEPER_BROKER_URL",
            "rediss://:pw@redis.internal:6380/0",
            "broker_url",
            "rediss://:pw@redis.internal:6380/0",
        ),
        ("ROOMKEEPER_RESULT_BACKEND", "redis://results:6379/1", "backend_url", "redis://results:6379/1"),
        (
            "ROOMKEEPER_DATABASE_URL",
            "postgresql://app@db/roomkeeper",
            "database_url",
            "postgresql://app@db/roomkeeper",
        ),
        (
            "ROOMKEEPER_DATABASE_URL",
            "sqlite:////srv/roomkeeper.db",
            "database_url",
            "sqlite:////srv/roomkeeper.db",
        ),
        ("ROOMKEEPER_QUEUE", "meetings.v2", "queue", "meetings.v2"),
        ("ROOMKEEPER_CREATE_LEAD_SECONDS", "120", "create_lead_seconds", 120),
        ("ROOMKEEPER_CREATE_LEAD_SECONDS", "0", "create_lead_seconds", 0),
        ("ROOMKEEPER_DELETE_GRACE_SECONDS", "300", "delete_grace_seconds", 300),
        ("ROOMKEEPER_DISPATCH_INTERVAL_SECONDS", "5", "dispatch_interval_seconds", 5),
        ("ROOMKEEPER_RECONCILE_INTERVAL_SECONDS", "60", "reconcile_interval_seconds", 60),
        ("ROOMKEEPER_API_POINTS_PER_MINUTE", "1000", "api_points_per_minute", 1000),
        ("ROOMKEEPER_API_POINTS_PER_MINUTE", "0", "api_points_per_minute", 0),
        ("ROOMKEEPER_ROOM_PREFIX", "clinic1", "room_prefix", "clinic1"),
        ("FLOWER_BASIC_AUTH", "ops:s3cret:with-colon", "flower_basic_auth", "ops:s3cret:with-colon"),
    ],
)
def test_each_variable_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
    sandbox_env: None,
    variable: str,
    value: str,
    attribute: str,
    expected: Any,
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(load_settings(), attribute) == expected


def test_result_backend_follows_the_broker_unless_set(
    monkeypatch: pytest.MonkeyPatch, sandbox_env: None
) -> None:
    monkeypatch.setenv("ROOMKEEPER_BROKER_URL", "redis://broker:6379/4")
    assert load_settings().backend_url == "redis://broker:6379/4"
    assert celery_config(load_settings())["result_backend"] == "redis://broker:6379/4"

    monkeypatch.setenv("ROOMKEEPER_RESULT_BACKEND", "redis://results:6379/5")
    config = celery_config(load_settings())
    assert config["broker_url"] == "redis://broker:6379/4"
    assert config["result_backend"] == "redis://results:6379/5"


# --------------------------------------------------------------------------------------------
# Invalid values stop the process with a message that names the variable.


@pytest.mark.parametrize(
    ("variable", "value", "rule"),
    [
        ("ROOMKEEPER_BROKER_URL", "amqp://guest@localhost//", "redis"),
        ("ROOMKEEPER_BROKER_URL", "localhost:6379", "redis"),
        ("ROOMKEEPER_RESULT_BACKEND", "db+sqlite:///results.db", "redis"),
        ("ROOMKEEPER_DATABASE_URL", "mysql://app@db/roomkeeper", "postgresql"),
        ("ROOMKEEPER_DATABASE_URL", "var/roomkeeper.db", "sqlite"),
        ("ROOMKEEPER_CREATE_LEAD_SECONDS", "-1", "greater than or equal to 0"),
        ("ROOMKEEPER_CREATE_LEAD_SECONDS", "fifteen minutes", "number"),
        ("ROOMKEEPER_DELETE_GRACE_SECONDS", "-30", "greater than or equal to 0"),
        ("ROOMKEEPER_DISPATCH_INTERVAL_SECONDS", "0", "greater than 0"),
        ("ROOMKEEPER_RECONCILE_INTERVAL_SECONDS", "-300", "greater than 0"),
        ("ROOMKEEPER_API_POINTS_PER_MINUTE", "1.5", "integer"),
        ("ROOMKEEPER_API_POINTS_PER_MINUTE", "lots", "integer"),
        ("ROOMKEEPER_API_POINTS_PER_MINUTE", "-100", "greater than or equal to 0"),
        ("ROOMKEEPER_ROOM_PREFIX", "RK", "[a-z0-9]"),
        ("ROOMKEEPER_ROOM_PREFIX", "rk-", "[a-z0-9]"),
        ("ROOMKEEPER_ROOM_PREFIX", "roomkeeper", "1-8"),
        ("ROOMKEEPER_QUEUE", "rooms queue", "letters"),
        ("ROOMKEEPER_QUEUE", "q" * 101, "1-100"),
        ("FLOWER_BASIC_AUTH", "admin", "user:password"),
        ("FLOWER_BASIC_AUTH", "admin:", "user:password"),
        ("WHEREBY_API_URL", "ftp://api.whereby.dev/v1", "http"),
        ("WHEREBY_API_URL", "api.whereby.dev/v1", "http"),
        ("ROOMKEEPER_RETENTION_DAYS", "-1", "greater than or equal to 0"),
        ("ROOMKEEPER_RETENTION_DAYS", "ninety", "integer"),
        ("ROOMKEEPER_DELIVERED_RETENTION_DAYS", "1.5", "integer"),
        ("ROOMKEEPER_PRUNE_INTERVAL_SECONDS", "0", "greater than 0"),
    ],
)
def test_invalid_value_stops_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, sandbox_env: None, variable: str, value: str, rule: str
) -> None:
    message = settings_error(monkeypatch, **{variable: value})
    assert names_variable(message, variable), message
    assert rule in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FLOWER_BASIC_AUTH", "admin"),
        ("FLOWER_BASIC_AUTH", "admin:"),
        ("FLOWER_BASIC_AUTH", ":secret"),
        ("WHEREBY_API_URL", "ftp://api.whereby.dev/v1"),
        ("WHEREBY_API_URL", "api.whereby.dev/v1"),
        ("WHEREBY_API_URL", "https://"),
    ],
)
def test_invalid_aliased_variables_are_rejected(
    monkeypatch: pytest.MonkeyPatch, sandbox_env: None, variable: str, value: str
) -> None:
    message = settings_error(monkeypatch, **{variable: value})
    assert variable in message


def test_every_invalid_variable_is_reported_at_once(
    monkeypatch: pytest.MonkeyPatch, sandbox_env: None
) -> None:
    message = settings_error(
        monkeypatch,
        ROOMKEEPER_CREATE_LEAD_SECONDS="-1",
        ROOMKEEPER_QUEUE="bad queue",
        ROOMKEEPER_ROOM_PREFIX="R",
    )
    for variable in ("ROOMKEEPER_CREATE_LEAD_SECONDS", "ROOMKEEPER_QUEUE", "ROOMKEEPER_ROOM_PREFIX"):
        assert names_variable(message, variable), message


def test_settings_error_stops_the_process() -> None:
    # Raised from a process entry point, it exits non-zero with the message instead of a traceback.
    assert issubclass(SettingsError, SystemExit)


# --------------------------------------------------------------------------------------------
# The API key.


def key_error(settings: Settings) -> str:
    """What a process that calls Whereby is stopped with (the worker and beat at start, the client)."""
    with pytest.raises(SettingsError) as caught:
        settings.require_whereby_key()
    message = str(caught.value)
    with pytest.raises(SettingsError) as caught_by_client:
        _ = settings.api_key  # what the Whereby client is built with: never the sandbox's key
    assert str(caught_by_client.value) == message
    return message


@pytest.mark.parametrize("url", [None, "https://api.whereby.dev/v1", "https://api.whereby.com/v1"])
def test_api_key_is_required_for_whereby(monkeypatch: pytest.MonkeyPatch, url: str | None) -> None:
    if url is not None:
        monkeypatch.setenv("WHEREBY_API_URL", url)
    # The settings load (commands that only read the store need no key)...
    settings = load_settings()
    assert settings.is_real_whereby
    # ...but whatever would call Whereby stops, naming the variable.
    message = key_error(settings)
    assert names_variable(message, "WHEREBY_API_KEY"), message
    assert "required" in message


def test_api_key_given_for_whereby_passes_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHEREBY_API_KEY", SECRET_KEY)
    settings = load_settings()
    assert settings.require_whereby_key() is settings
    assert settings.api_key == SECRET_KEY


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8088/v1", "http://localhost:8088/v1", "http://sandbox:8088/v1"]
)
def test_api_key_is_not_required_for_a_sandbox(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("WHEREBY_API_URL", url)
    settings = load_settings()
    assert settings.require_whereby_key() is settings
    assert settings.whereby_api_key is None
    assert settings.is_real_whereby is False
    assert settings.api_key == "sandbox-key"


def test_api_key_given_for_a_sandbox_is_used(monkeypatch: pytest.MonkeyPatch, sandbox_env: None) -> None:
    monkeypatch.setenv("WHEREBY_API_KEY", "my-sandbox-key")
    assert load_settings().api_key == "my-sandbox-key"


def test_empty_api_key_is_rejected_for_whereby(monkeypatch: pytest.MonkeyPatch) -> None:
    # `WHEREBY_API_KEY=` (declared, not given) must stop the start, not fail every Whereby call later.
    monkeypatch.setenv("WHEREBY_API_KEY", "")
    message = key_error(load_settings())
    assert names_variable(message, "WHEREBY_API_KEY"), message


@pytest.mark.parametrize("process", ["worker", "beat"])
def test_worker_and_beat_without_a_key_for_whereby_stop_at_start(tmp_path: Path, process: str) -> None:
    # The Procfile's own commands. The broker is a closed port: a process that got past the check
    # would wait there for it until the timeout, consuming nothing of anyone's.
    env = {
        **os.environ,
        "WHEREBY_API_URL": "https://api.whereby.dev/v1",
        "ROOMKEEPER_BROKER_URL": "redis://127.0.0.1:9/0",
        "ROOMKEEPER_DATABASE_URL": f"sqlite:///{tmp_path / 'roomkeeper.db'}",
    }
    command = {"worker": ["worker", "--pool=solo"], "beat": ["beat", f"--pidfile={tmp_path / 'beat.pid'}"]}
    celery = str(Path(sys.executable).parent / "celery")
    done = subprocess.run(
        [celery, "-A", "worker.runtime.app", *command[process], "--loglevel=WARNING"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "WHEREBY_API_KEY is required when WHEREBY_API_URL points at Whereby" in output, output[-2000:]


def test_api_key_never_appears_in_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHEREBY_API_KEY", SECRET_KEY)
    settings = load_settings()
    assert settings.api_key == SECRET_KEY  # it was read...
    assert SECRET_KEY not in repr(settings)  # ...but is never shown
    assert SECRET_KEY not in str(settings)
    assert SECRET_KEY not in repr(settings.model_dump())
    assert SECRET_KEY not in str(celery_config(settings))


def test_api_key_never_appears_in_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    message = settings_error(
        monkeypatch, WHEREBY_API_KEY=SECRET_KEY, ROOMKEEPER_BROKER_URL="amqp://x", ROOMKEEPER_QUEUE="a b"
    )
    assert SECRET_KEY not in message


# --------------------------------------------------------------------------------------------
# The Celery configuration.


@pytest.fixture
def config(sandbox_env: None) -> dict[str, Any]:
    return celery_config(load_settings())


def test_celery_delivery_is_at_least_once_one_message_at_a_time(config: dict[str, Any]) -> None:
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["broker_connection_retry_on_startup"] is True


def test_celery_runs_in_utc(config: dict[str, Any]) -> None:
    assert config["timezone"] == "UTC"
    assert config["enable_utc"] is True


def test_celery_sends_events_for_flower(config: dict[str, Any]) -> None:
    assert config["worker_send_task_events"] is True
    assert config["task_send_sent_event"] is True


def test_celery_speaks_json_only(config: dict[str, Any]) -> None:
    assert config["task_serializer"] == "json"
    assert config["result_serializer"] == "json"
    assert config["accept_content"] == ["json"]


def test_broker_and_backend_share_a_visibility_timeout_longer_than_any_task(config: dict[str, Any]) -> None:
    timeout = config["broker_transport_options"]["visibility_timeout"]
    assert config["result_backend_transport_options"]["visibility_timeout"] == timeout
    # A message whose task is still running (or waiting out its countdown) must not be redelivered.
    assert timeout > config["task_time_limit"]
    assert timeout > load_settings().dispatch_interval_seconds


def test_time_limits_hard_after_soft(monkeypatch: pytest.MonkeyPatch, sandbox_env: None) -> None:
    config = celery_config(load_settings())
    assert 0 < config["task_soft_time_limit"] < config["task_time_limit"]

    monkeypatch.setenv("ROOMKEEPER_TASK_TIME_LIMIT_SECONDS", "120")
    config = celery_config(load_settings())
    assert config["task_soft_time_limit"] == 120
    assert config["task_time_limit"] > 120


def test_results_expire(config: dict[str, Any]) -> None:
    assert 0 < config["result_expires"] <= 7 * 24 * 3600


def test_queue_comes_from_roomkeeper_queue(monkeypatch: pytest.MonkeyPatch, sandbox_env: None) -> None:
    default = celery_config(load_settings())
    assert default["task_default_queue"] == "rooms"
    assert [q.name for q in default["task_queues"]] == ["rooms"]

    monkeypatch.setenv("ROOMKEEPER_QUEUE", "meetings-eu")
    config = celery_config(load_settings())
    assert config["task_default_queue"] == "meetings-eu"
    assert [q.name for q in config["task_queues"]] == ["meetings-eu"]
    assert {entry["options"]["queue"] for entry in config["beat_schedule"].values()} == {"meetings-eu"}


def _schedule_by_task(settings: Settings) -> dict[str, Any]:
    entries = beat_schedule(settings).values()
    by_task = {entry["task"]: entry["schedule"] for entry in entries}
    assert len(by_task) == len(entries), "one beat entry per task"
    return by_task


def test_beat_schedule_defaults(sandbox_env: None) -> None:
    assert _schedule_by_task(load_settings()) == {
        "rooms.dispatch_due": 15,
        "rooms.recover_overdue": 2,
        "rooms.reconcile": 300,
        "rooms.sweep_webhooks": 2,
        "rooms.dispatch_deliveries": 15,
        "feeds.poll_due": 30,
        "rooms.prune": 600,
    }


def test_beat_schedule_follows_the_intervals(monkeypatch: pytest.MonkeyPatch, sandbox_env: None) -> None:
    monkeypatch.setenv("ROOMKEEPER_DISPATCH_INTERVAL_SECONDS", "7")
    monkeypatch.setenv("ROOMKEEPER_RECONCILE_INTERVAL_SECONDS", "120")
    monkeypatch.setenv("ROOMKEEPER_RECOVER_INTERVAL_SECONDS", "1.5")
    monkeypatch.setenv("ROOMKEEPER_PRUNE_INTERVAL_SECONDS", "60")
    settings = load_settings()
    assert _schedule_by_task(settings) == {
        "rooms.dispatch_due": 7,
        "rooms.recover_overdue": 1.5,
        "rooms.reconcile": 120,
        "rooms.sweep_webhooks": 1.5,
        "rooms.dispatch_deliveries": 7,
        "feeds.poll_due": 30,
        "rooms.prune": 60,
    }
    assert celery_config(settings)["beat_schedule"] == beat_schedule(settings)
