"""Domain metrics recorded by workers (a placeholder until the Redis-backed version lands)."""

from __future__ import annotations


def observe_deletion_lag(seconds: float) -> None:
    """Record how late a room's deletion was, against its due instant."""
