"""Fault injection: the scripted faults queued through /_sandbox/faults and the seeded random ones."""

from __future__ import annotations

import random
from typing import Any

from worker.devtools.sandbox.config import SandboxConfig, number
from worker.devtools.sandbox.wire import BadRequest

INJECTED_ERROR_STATUSES = (500, 502, 503)
SCRIPT_METHODS = ("GET", "POST", "DELETE", "*")
SCRIPT_ACTIONS = ("error", "lost_reply", "rate_limit")


def check_step(step: Any) -> dict[str, Any]:
    """Validates one scripted fault and fills in its defaults."""
    if not isinstance(step, dict):
        raise BadRequest("script: each step must be an object")
    unknown = set(step) - {"method", "action", "status", "retry_after", "mode"}
    if unknown:
        raise BadRequest(f"script: unknown step key {min(unknown)}")
    method = str(step.get("method", "*")).upper()
    if method not in SCRIPT_METHODS:
        raise BadRequest("script: method must be GET, POST, DELETE or *")
    action = step.get("action")
    if action not in SCRIPT_ACTIONS:
        raise BadRequest("script: action must be error, lost_reply or rate_limit")
    checked: dict[str, Any] = {"method": method, "action": action}
    if action == "error":
        status = step.get("status", 503)
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise BadRequest("script: status must be an integer from 400 to 599")
        checked["status"] = status
    elif action == "lost_reply":
        mode = step.get("mode")
        if mode not in (None, "error", "stall"):
            raise BadRequest("script: mode must be error or stall")
        checked["mode"] = mode
    else:
        checked["retry_after"] = number("script: retry_after", step.get("retry_after", 1), 0)
    return checked


class Faults:
    """The pending script and the random faults drawn from ``config`` with a seeded generator.

    Not locked: the Sandbox that owns it calls it under its own lock.
    """

    def __init__(self, config: SandboxConfig):
        self.config = config
        self._rng = random.Random(config.seed)
        self._script: list[dict[str, Any]] = []

    def pending(self) -> list[dict[str, Any]]:
        return [dict(step) for step in self._script]

    def extend(self, steps: list[dict[str, Any]]) -> None:
        """Appends steps already passed through check_step."""
        self._script.extend(steps)

    def take_step(self, method: str) -> dict[str, Any] | None:
        """Removes and returns the first scripted step for ``method``, if any."""
        for index, step in enumerate(self._script):
            if step["method"] in (method, "*"):
                return self._script.pop(index)
        return None

    def random_error(self) -> int | None:
        """The status of an injected server error, or None; draws only when error_rate > 0."""
        if self.config.error_rate > 0 and self._rng.random() < self.config.error_rate:
            return self._rng.choice(INJECTED_ERROR_STATUSES)
        return None

    def random_lost_reply(self, method: str) -> str | None:
        """The lost-reply mode for a create whose answer goes missing, or None."""
        if (
            method == "POST"
            and self.config.lost_reply_rate > 0
            and self._rng.random() < self.config.lost_reply_rate
        ):
            return self.config.lost_reply_mode
        return None

    def reset(self) -> None:
        self._script.clear()
        # A seeded run after a reset replays the same faults as a fresh sandbox would.
        self._rng = random.Random(self.config.seed)
