"""The house rules, checked on the source (pure: `ast` only, nothing imported, seconds).

No product module over 400 lines; no import cycle between product modules; nothing in
`worker/rules/` does I/O; no product module imports `worker.devtools` (the CLI's lazy import for
`sandbox`, `demo` and `run` is the one exception); every package under `worker/` is named in the
README's architecture section. Each checker takes its inputs, so a test can plant a violation and
see it caught.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("worker", "tasks", "config")
NOT_PRODUCT = ("worker/devtools", "worker/store/migrations")
MAX_LINES = 400

# What a rule may import: the pure parts of the standard library, pydantic (validation), the
# settings' type, and other rules. Anything else (sqlalchemy, sqlmodel, httpx, redis, celery,
# socket, os, time, random, secrets, uuid, the store, the adapters ...) is I/O or chance.
RULES_MAY_IMPORT = {
    "__future__",
    "annotated_types",
    "collections",
    "collections.abc",
    "dataclasses",
    "datetime",
    "decimal",
    "enum",
    "functools",
    "hashlib",  # a digest of the inputs: the rules' jitter (no chance)
    "ipaddress",  # parsing an address: the outbound rules (no resolving)
    "itertools",
    "json",
    "math",
    "operator",
    "pydantic",
    "pydantic_core",
    "re",
    "string",
    "typing",
    "urllib.parse",
    "zoneinfo",
    "config.settings",
}
# Names a rule may not call or import even from an allowed module: the clock and the environment.
RULES_MAY_NOT_USE = {"now", "utcnow", "today", "get_settings", "reset_settings", "environ", "getenv", "open"}
# The one product module that may import the dev tools, and only inside a function (lazily).
DEVTOOLS_LAZY_IMPORTERS = {"worker.faces.cli.main"}


@dataclass(frozen=True)
class Import:
    target: str  # the module imported (a submodule when `from package import module`)
    names: tuple[str, ...]  # the names taken from it (`from x import a, b`), empty for `import x`
    lazy: bool  # inside a function


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_sources(root: Path = ROOT) -> dict[str, tuple[Path, str]]:
    """Every product module by its dotted name: (path, source)."""
    found: dict[str, tuple[Path, str]] = {}
    for top in PRODUCT:
        for path in sorted((root / top).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if any(relative.startswith(excluded + "/") for excluded in NOT_PRODUCT):
                continue
            found[module_name(path, root)] = (path, path.read_text())
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, source: str, known: Iterable[str], is_package: bool = False) -> list[Import]:
    """What the module imports at run time, module level and inside functions alike."""
    known = set(known)
    package = name if is_package else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other, lazy)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(alias.name, (), lazy))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                names = tuple(alias.name for alias in child.names)
                submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
                for sub in submodules:
                    found.append(Import(sub, (), lazy))
                if len(submodules) < len(names):
                    found.append(Import(base, names, lazy))
            visit(child, lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(source), False)
    return found


def import_graph(sources: Mapping[str, str], packages: Iterable[str] = ()) -> dict[str, list[Import]]:
    packages = set(packages)
    return {name: imports_of(name, source, sources, name in packages) for name, source in sources.items()}


def long_modules(sources: Mapping[str, str], limit: int = MAX_LINES) -> dict[str, int]:
    return {name: n for name, source in sources.items() if (n := len(source.splitlines())) > limit}


def cycles(graph: Mapping[str, Iterable[Import]]) -> list[list[str]]:
    """The import cycles between the graph's own modules (Tarjan's strongly connected components)."""
    edges = {
        name: sorted({i.target for i in imports if i.target in graph}) for name, imports in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges[node]:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def rules_violations(sources: Mapping[str, str], graph: Mapping[str, Iterable[Import]]) -> list[str]:
    """What the rules import or call that is I/O, the clock, the environment or chance."""
    found: list[str] = []
    for name, imports in graph.items():
        if not (name == "worker.rules" or name.startswith("worker.rules.")):
            continue
        for imp in imports:
            if not (imp.target in RULES_MAY_IMPORT or imp.target.startswith("worker.rules")):
                found.append(f"{name} imports {imp.target}")
            elif bad := sorted(set(imp.names) & RULES_MAY_NOT_USE):
                found.append(f"{name} imports {', '.join(bad)} from {imp.target}")
        for node in ast.walk(ast.parse(sources[name])):
            if isinstance(node, ast.Call):
                called = node.func
                attr = called.attr if isinstance(called, ast.Attribute) else getattr(called, "id", None)
                if attr in RULES_MAY_NOT_USE:
                    found.append(f"{name}:{node.lineno} calls {attr}()")
            elif isinstance(node, ast.Attribute) and node.attr == "environ":
                found.append(f"{name}:{node.lineno} reads the environment")
    return found


def devtools_importers(
    graph: Mapping[str, Iterable[Import]], lazy_allowed: Iterable[str] = DEVTOOLS_LAZY_IMPORTERS
) -> list[str]:
    """Product modules that import the dev tools (the allowed ones only from inside a function)."""
    allowed = set(lazy_allowed)
    return sorted(
        f"{name} imports {imp.target}" + (" at module level" if not imp.lazy else "")
        for name, imports in graph.items()
        if not name.startswith("worker.devtools")
        for imp in imports
        if (imp.target == "worker.devtools" or imp.target.startswith("worker.devtools."))
        and not (imp.lazy and name in allowed)
    )


# Calls that hook into something process-wide; at import they would run for whoever imports.
HOOKS = {"register_at_fork", "listens_for", "listen", "addFilter", "install", "on_reset", "connect"}
# Signal handlers declared by the Celery app are its entry's own (they run when that process starts).
HOOKS_AT_IMPORT_ALLOWED = {"worker.runtime.app"}


def hooks_at_import(
    sources: Mapping[str, str], allowed: Iterable[str] = HOOKS_AT_IMPORT_ALLOWED
) -> list[str]:
    """Module-level statements (decorators of module-level definitions included) that call a hook."""
    allowed = set(allowed)
    found: list[str] = []
    for name, source in sources.items():
        if name in allowed:
            continue
        for statement in ast.parse(source).body:
            if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                nodes: list[ast.AST] = [n for d in statement.decorator_list for n in ast.walk(d)]
            else:
                nodes = list(ast.walk(statement))
            for node in nodes:
                if isinstance(node, ast.Call):
                    called = node.func
                    attr = called.attr if isinstance(called, ast.Attribute) else getattr(called, "id", None)
                    if attr in HOOKS:
                        found.append(f"{name}:{node.lineno} {attr}")
    return sorted(found)


def architecture_section(readme: str) -> str:
    match = re.search(r"^## Architecture\n(.*?)(?=^## )", readme, re.S | re.M)
    return match.group(1) if match else ""


def unnamed_packages(packages: Iterable[str], section: str) -> list[str]:
    """Packages (as folder paths, `worker/jobs/feeds`) the architecture section does not name."""
    return sorted(p for p in packages if not re.search(rf"`{re.escape(p)}/?`", section))


def worker_packages(root: Path = ROOT) -> list[str]:
    return sorted(
        init.parent.relative_to(root).as_posix()
        for init in (root / "worker").rglob("__init__.py")
        if "migrations" not in init.parent.relative_to(root).parts
    )


# --------------------------------------------------------------------------------------------
# The tree as it is.

SOURCES = product_sources()
TEXTS = {name: source for name, (_, source) in SOURCES.items()}
PACKAGES = {name for name, (path, _) in SOURCES.items() if path.name == "__init__.py"}
GRAPH = import_graph(TEXTS, PACKAGES)


def test_the_checker_sees_the_product() -> None:
    assert {"worker.runtime.resources", "worker.rules.lifecycle", "tasks.rooms", "config.settings"} <= set(
        TEXTS
    )
    assert not any(name.startswith(("worker.devtools", "worker.store.migrations")) for name in TEXTS)
    assert any(i.target == "worker.runtime.resources" for i in GRAPH["worker.store"])


def test_no_product_module_is_over_400_lines() -> None:
    assert long_modules(TEXTS) == {}


def test_no_import_cycle_between_product_modules() -> None:
    assert cycles(GRAPH) == []


def test_the_rules_do_no_io() -> None:
    assert rules_violations(TEXTS, GRAPH) == []


def test_nothing_is_registered_at_import() -> None:
    assert hooks_at_import(TEXTS) == []


def test_no_product_module_imports_the_dev_tools() -> None:
    assert devtools_importers(GRAPH) == []


def test_every_package_under_worker_is_named_in_the_readme_architecture() -> None:
    section = architecture_section((ROOT / "README.md").read_text())
    assert section, "README.md has no '## Architecture' section"
    assert unnamed_packages(worker_packages(), section) == []


# --------------------------------------------------------------------------------------------
# Each check catches a planted violation.


def _graph(**modules: str) -> tuple[dict[str, str], dict[str, list[Import]]]:
    """Planted modules: `worker__rules__x` is `worker.rules.x`."""
    sources = {name.replace("__", "."): src for name, src in modules.items()}
    return sources, import_graph(sources)


def test_a_long_module_is_caught() -> None:
    assert long_modules({"worker.big": "x = 1\n" * 401, "worker.ok": "x = 1\n" * 400}) == {"worker.big": 401}


def test_a_cycle_is_caught_through_a_function_level_import() -> None:
    _, graph = _graph(
        worker__a="from worker import b\n",
        worker__b="def f():\n    from worker.c import thing\n",
        worker__c="import worker.a\n",
        worker__d="from worker import a\n",
    )
    assert cycles(graph) == [["worker.a", "worker.b", "worker.c"]]


def test_a_relative_import_and_a_type_checking_import_are_read_right() -> None:
    sources, graph = _graph(
        worker__store="from . import models\n",
        worker__store__models="from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from worker import store\n",
    )
    graph = import_graph(sources, {"worker.store"})
    assert [i.target for i in graph["worker.store"]] == ["worker.store.models"]
    assert cycles(graph) == []


def test_rules_that_touch_io_the_clock_or_the_environment_are_caught() -> None:
    sources, graph = _graph(
        worker__rules__good="from datetime import datetime\nimport re\nfrom worker.rules import other\n"
        "def f(now: datetime) -> datetime:\n    return now\n",
        worker__rules__other="",
        worker__rules__net="import httpx\n",
        worker__rules__chance="import random\n",
        worker__rules__clock="from datetime import datetime\ndef f():\n    return datetime.now()\n",
        worker__rules__env="from config.settings import get_settings\n",
        worker__rules__store="from worker.store.models import Meeting\n",
        worker__jobs__free="import httpx\n",
    )
    found = rules_violations(sources, graph)
    assert not [f for f in found if "good" in f or "other" in f or "jobs" in f]
    assert "worker.rules.net imports httpx" in found
    assert "worker.rules.chance imports random" in found
    assert "worker.rules.clock:3 calls now()" in found
    assert "worker.rules.env imports get_settings from config.settings" in found
    assert "worker.rules.store imports worker.store.models" in found


def test_an_import_of_the_dev_tools_is_caught_unless_lazy_in_the_cli() -> None:
    _, graph = _graph(
        worker__faces__cli__main="def sandbox():\n    from worker.devtools.sandbox import serve\n",
        worker__jobs__x="from worker.devtools import harness\n",
        worker__faces__web__y="def f():\n    import worker.devtools.demo\n",
        worker__devtools__demo="from worker.devtools import harness\n",
        worker__devtools__harness="",
    )
    assert devtools_importers(graph) == [
        "worker.faces.web.y imports worker.devtools.demo",
        "worker.jobs.x imports worker.devtools.harness at module level",
    ]
    _, eager = _graph(worker__faces__cli__main="from worker.devtools import sandbox\n")
    assert devtools_importers(eager) == ["worker.faces.cli.main imports worker.devtools at module level"]


def test_a_hook_installed_at_import_is_caught() -> None:
    sources = {
        "worker.a": "import os\nos.register_at_fork(after_in_child=print)\n",
        "worker.b": "from sqlalchemy import event\n@event.listens_for(object, 'x')\ndef f(): ...\n",
        "worker.c": "from worker.runtime import celery_fixes\ncelery_fixes.install()\n",
        "worker.ok": "import os\ndef start():\n    os.register_at_fork(after_in_child=print)\n",
    }
    assert hooks_at_import(sources) == [
        "worker.a:2 register_at_fork",
        "worker.b:2 listens_for",
        "worker.c:2 install",
    ]


def test_a_package_missing_from_the_architecture_section_is_caught() -> None:
    readme = "# x\n## Architecture\n- `worker/rules/`: pure.\n- `worker/jobs`: jobs.\n"
    readme += "## Settings\n`worker/store/`\n"
    section = architecture_section(readme)
    assert unnamed_packages(["worker/rules", "worker/jobs", "worker/store"], section) == ["worker/store"]
    assert unnamed_packages(["worker/jobs/feeds"], "`worker/jobs/feeds.py`") == ["worker/jobs/feeds"]


def test_no_import_cycle_between_the_benchmark_modules() -> None:
    sources = {module_name(path): path.read_text() for path in sorted((ROOT / "bench").glob("*.py"))}
    assert "bench.run" in sources and "bench.bookings" in sources
    assert cycles(import_graph(sources, {"bench"})) == []
