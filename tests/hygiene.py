"""Test hygiene: a suite that passes leaves the temporary directory as it found it, and row ids are
never reused from one test to the next.

- Every temporary file of a run (pytest's own `tmp_path`s, the SQLite store, the processes' logs,
  embedded Redis, Radicale, a browser's profile: anything made through `tempfile` or `TMPDIR`, here
  and in the processes the tests start) goes under one folder of the run's own,
  `$TMPDIR/roomkeeper-tests-XXXX`. A run that passes removes it; one that fails keeps it and says where.
- A test's process logs (`worker/devtools/harness.py` ProcessSystem) are removed when the test passed,
  and kept,
  named in the test's report, when it failed.
- The check: when every test passed, anything still in the run's folder at the end (beyond pytest's
  own, which pytest removes) was left behind by a test or a fixture: the run fails, naming it.
- SQLite reuses the largest rowid + 1, so clearing a table between tests would hand the next test the
  ids of the last one (a message of an earlier test could then act on a new row). The tests' SQLite
  store is given AUTOINCREMENT ids (a rebuild of each table right after the migrations, test-only),
  so `sqlite_sequence` keeps counting across the clearing. PostgreSQL's sequences do already.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest

PREFIX = "roomkeeper-tests-"
_outcomes = pytest.StashKey[dict[str, bool]]()


class RunFolder:
    """The run's own temporary folder, made the temporary directory of this process and its children."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kept_logs: list[Path] = []
        self.left: list[str] = []
        self.removed = False

    @classmethod
    def start(cls) -> RunFolder:
        folder = cls(Path(tempfile.mkdtemp(prefix=PREFIX)))
        os.environ["TMPDIR"] = str(folder.path)
        tempfile.tempdir = str(folder.path)
        return folder

    def leftovers(self) -> list[str]:
        """What is still in the folder, beyond pytest's own `pytest-of-USER` (which pytest cleans)."""
        if not self.path.is_dir():
            return []
        return sorted(entry.name for entry in self.path.iterdir() if not entry.name.startswith("pytest-of-"))

    def finish(self, session: pytest.Session) -> None:
        """At the end of the run (after pytest has removed its own folders when the run passed)."""
        passed = session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
        if not passed:
            return  # kept, with everything in it; the summary says where
        self.left = self.leftovers()
        if self.left:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        shutil.rmtree(self.path, ignore_errors=True)
        self.removed = True

    def summary(self, terminal: Any) -> None:
        if self.left:
            terminal.section("temporary files left behind", sep="=", red=True, bold=True)
            terminal.line(
                f"every test passed, but these were left in {self.path} (now removed): "
                + ", ".join(self.left)
            )
        elif not self.removed:
            terminal.section("temporary files", sep="-")
            terminal.line(f"kept for the failures: {self.path}")
            for logs in self.kept_logs:
                terminal.line(f"  process logs: {logs}")

    def after_phase(self, item: pytest.Item, report: pytest.TestReport, systems: list[Any]) -> None:
        """Called with each phase's report: once the test is torn down, its stopped processes' logs
        go if it passed, and are kept, and named, if it failed."""
        outcomes = item.stash.setdefault(_outcomes, {})
        outcomes[report.when] = report.failed
        if report.when != "teardown":
            return
        failed = any(outcomes.values())
        for system in [s for s in systems if s.stopped]:
            systems.remove(system)
            logs = Path(system.logs)
            if not logs.exists():
                continue
            if failed:
                self.kept_logs.append(logs)
                report.sections.append(("roomkeeper process logs", f"kept in {logs}"))
            else:
                shutil.rmtree(logs, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Ids never reused on SQLite.

_FIRST_COLUMN_ID = re.compile(r"^(CREATE TABLE\s+(\"?)(\w+)\2\s*\(\s*)id INTEGER NOT NULL,", re.IGNORECASE)
_TABLE_KEY = re.compile(r",\s*PRIMARY KEY \(id\)", re.IGNORECASE)


def sqlite_ids_never_reused(path: str) -> list[str]:
    """Rebuild each table of the SQLite store at `path` whose key is `id INTEGER ... PRIMARY KEY (id)`
    with `id INTEGER PRIMARY KEY AUTOINCREMENT` (SQLite's documented way to change a table: make
    the new one, copy, drop, rename, make the indexes again). The rows' storage is the same; only
    the choice of new ids changes: never one used before in that table. Returns the tables changed."""
    changed: list[str] = []
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA foreign_keys = OFF")
        connection.execute("BEGIN IMMEDIATE")
        tables = connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
        for name, sql in tables:
            match = _FIRST_COLUMN_ID.match(sql or "")
            if match is None or not _TABLE_KEY.search(sql):
                continue
            indexes = [
                row[0]
                for row in connection.execute(
                    "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
                    (name,),
                )
            ]
            columns = _TABLE_KEY.sub("", sql[match.end(1) + len("id INTEGER NOT NULL,") :], count=1)
            rebuilt = (
                f'CREATE TABLE "{name}__rebuilt" (id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,{columns}'
            )
            connection.execute(rebuilt)
            connection.execute(f'INSERT INTO "{name}__rebuilt" SELECT * FROM "{name}"')
            connection.execute(f'DROP TABLE "{name}"')
            connection.execute(f'ALTER TABLE "{name}__rebuilt" RENAME TO "{name}"')
            for index in indexes:
                connection.execute(index)
            changed.append(name)
        connection.execute("COMMIT")
    finally:
        connection.close()
    return changed
