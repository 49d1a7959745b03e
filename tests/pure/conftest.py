"""The pure tier does no I/O: a test here that opens a connection or starts a program fails, naming it."""

from __future__ import annotations

import socket
import subprocess
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(what: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(
                f"a pure test does no I/O, and this one {what} (move it to tests/store or tests/processes)"
            )

        return refused

    monkeypatch.setattr(socket.socket, "connect", refuse("opened a connection"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("opened a connection"))
    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse("started a program"))
