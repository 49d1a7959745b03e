"""Runs the Procfile's processes with honcho, for `make run` and `make demo`."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from honcho.environ import parse_procfile
from honcho.manager import Manager
from honcho.printer import Printer

ROOT = Path(__file__).resolve().parents[2]  # the repository: worker/devtools/ is two below
PROCFILE = ROOT / "Procfile"


def procfile_commands() -> dict[str, str]:
    return dict(parse_procfile(PROCFILE.read_text()).processes)


def process_env(overrides: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    # The Procfile names `celery` and `roomkeeper`: find them beside this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_processes(
    names: Sequence[str],
    env: Mapping[str, str],
    *,
    output: IO[str] | None = None,
    ports: Mapping[str, int] | None = None,
    driver: Callable[[Manager], None] | None = None,
) -> int:
    """Run the named Procfile processes until one stops or, with a driver, until it returns.

    The driver runs in a thread beside honcho's loop (which must own the main thread for signals).
    """
    commands = procfile_commands()
    manager = Manager(Printer(output or sys.stdout, colour=output is None))
    for name in names:
        proc_env = dict(env)
        if ports and name in ports:
            proc_env["PORT"] = str(ports[name])
        manager.add_process(name, commands[name], env=proc_env, cwd=str(ROOT))
    if driver is not None:

        def drive() -> None:
            try:
                driver(manager)
            finally:
                manager.terminate()

        threading.Thread(target=drive, name="driver", daemon=True).start()
    manager.loop()
    return int(manager.returncode or 0)
