"""SandboxConfig and the checks every tunable setting passes, at start and through /_sandbox/faults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from worker.devtools.sandbox.wire import BadRequest


@dataclass
class SandboxConfig:
    api_key: str = "sandbox-key"
    points_per_minute: int = 0
    latency_ms: float = 0.0
    error_rate: float = 0.0
    lost_reply_rate: float = 0.0
    lost_reply_mode: str = "error"
    stall_seconds: float = 30.0
    expiry_seconds: float = 86400.0
    delete_unknown_status: int = 204
    public_url: str = "https://sandbox.whereby.invalid"
    seed: int | None = None
    # Whereby's webhooks (worker.devtools.sandbox.webhooks) and the sessions behind them (participants).
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_duplicate_rate: float = 0.0
    webhook_reorder_rate: float = 0.0
    webhook_drop_rate: float = 0.0
    session_end_delay_seconds: float = 0.0
    insights_points: int = 3


# The knobs /_sandbox/faults may turn; api_key, public_url and seed are fixed for a sandbox's life.
TUNABLE = (
    "latency_ms",
    "error_rate",
    "lost_reply_rate",
    "lost_reply_mode",
    "stall_seconds",
    "points_per_minute",
    "expiry_seconds",
    "delete_unknown_status",
    "webhook_url",
    "webhook_secret",
    "webhook_duplicate_rate",
    "webhook_reorder_rate",
    "webhook_drop_rate",
    "session_end_delay_seconds",
    "insights_points",
)
# Never shown by /_sandbox/faults: the view says only whether one is set.
SECRETS = ("api_key", "webhook_secret")


def number(name: str, value: Any, low: float, high: float | None = None) -> float:
    # bool is an int to Python but never a number to a JSON client.
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise BadRequest(f"{name}: must be a number")
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise BadRequest(f"{name}: must be {bound}")
    return float(value)


def integer(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name}: must be an integer")
    if value < low:
        raise BadRequest(f"{name}: must be at least {low}")
    return value


def check_setting(name: str, value: Any) -> Any:
    """Validates one tunable config value and returns it in its stored type."""
    if name in ("latency_ms", "stall_seconds", "expiry_seconds", "session_end_delay_seconds"):
        return number(name, value, 0)
    if name in (
        "error_rate",
        "lost_reply_rate",
        "webhook_duplicate_rate",
        "webhook_reorder_rate",
        "webhook_drop_rate",
    ):
        return number(name, value, 0, 1)
    if name == "points_per_minute":
        return integer(name, value, 0)
    if name == "insights_points":
        return integer(name, value, 1)
    if name == "webhook_url":
        if value is None:
            return None
        if (
            not isinstance(value, str)
            or urlsplit(value).scheme not in ("http", "https")
            or not urlsplit(value).netloc
        ):
            raise BadRequest(f"{name}: must be an http(s) URL or null")
        return value
    if name == "webhook_secret":
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise BadRequest(f"{name}: must be a non-empty string or null")
        return value
    if name == "lost_reply_mode":
        if value not in ("error", "stall"):
            raise BadRequest(f"{name}: must be error or stall")
        return value
    if name == "delete_unknown_status":
        if isinstance(value, bool) or value not in (204, 404):
            raise BadRequest(f"{name}: must be 204 or 404")
        return value
    raise BadRequest(f"{name}: unknown setting")
