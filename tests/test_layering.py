"""The package's import structure, read from the source with ``ast`` (nothing is imported).

* no module imports a ``_private`` name of another metapt module (a name another module needs is
  public), nor from a ``_private`` module outside that module's own package (``metapt.hypergrad._tree``
  belongs to ``metapt.hypergrad``);
* no import cycle among metapt modules. Imports under ``if TYPE_CHECKING:`` (annotations only) do
  not count; imports inside a function do: a cycle through a deferred import is still a cycle;
* the configuration layer (``schema``, ``config``) imports no runtime module (trainer, runner,
  runs, session, devices, strategy, distributed, diagnostics, run_diagnosis), directly or through
  another module, not even inside a function.

A package ``__init__`` counts as its package's module; ``from . import x`` counts as importing the
submodule ``x`` when ``x`` is one. Imports through ``importlib`` (the domain registry) are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "metapt"
RUNTIME = ("trainer", "runner", "runs", "session", "devices", "strategy", "distributed", "diagnostics",
           "run_diagnosis")
CONFIGURATION = ("metapt.schema", "metapt.config")


def _modules(root: Path = SRC) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported metapt module, imported name or None, line) of every import outside ``if TYPE_CHECKING:``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, str | None, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "metapt" or alias.name.startswith("metapt."):
                    found.append((_known(alias.name, modules), None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "metapt" or target.startswith("metapt."):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:  # from . import x: the submodule x
                        found.append((sub, None, node.lineno))
                    else:
                        found.append((_known(target, modules), alias.name, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def _known(name: str, modules: dict[str, Path]) -> str:
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def _graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for target, _, line in _imports(module, path, modules):
            if target != module:
                edges.setdefault(target, line)
    return graph


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_imports(modules: dict[str, Path]) -> list[str]:
    bad = []
    for module, path in modules.items():
        for target, name, line in _imports(module, path, modules):
            if target == module:
                continue
            where = f"{module}:{line}"
            if name is not None and _private(name):
                bad.append(f"{where} imports {name} from {target}")
            parts = target.split(".")
            for i in range(1, len(parts)):  # a private module is its package's own: metapt.hypergrad._tree
                owner = ".".join(parts[:i])
                if _private(parts[i]) and not (module == owner or module.startswith(owner + ".")):
                    bad.append(f"{where} imports from {target}, private to {owner}")
                    break
    return bad


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_module_imports_a_private_name_of_another():
    assert _private_imports(_modules()) == []


def test_no_import_cycle_among_metapt_modules():
    assert _cycles(_graph(_modules())) == []


def _runtime_reached(graph: dict[str, dict[str, int]], module: str) -> list[str]:
    """The runtime modules ``module`` imports, directly or through other modules."""
    reached, todo = set(), [module]
    while todo:
        for target in graph.get(todo.pop(), {}):
            if target not in reached:
                reached.add(target)
                todo.append(target)
    return sorted(m for m in reached if m.rpartition(".")[2] in RUNTIME)


@pytest.mark.parametrize("module", CONFIGURATION)
def test_the_configuration_layer_imports_no_runtime_module(module):
    assert _runtime_reached(_graph(_modules()), module) == []


def test_the_checks_catch_each_kind_of_bad_import(tmp_path):
    """The three checks on a small package with one bad import of each kind (and allowed ones)."""
    files = {
        "__init__.py": "",
        "schema.py": "from .schedule import MetaSchedule\n",
        "schedule.py": "def later():\n    from .runner import x\n",  # deferred: still an import
        "runner.py": "from .trainer import _private, public as _alias\nfrom .sub._tree import tree\n",
        "trainer.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .runner import y\n"
                       "from . import strategy\n"),
        "strategy.py": "import metapt.trainer\n",
        "sub/__init__.py": "from ._tree import tree\n",
        "sub/_tree.py": "tree = 1\n",
    }
    for name, text in files.items():
        path = tmp_path / "metapt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    modules = _modules(tmp_path / "metapt")
    assert _private_imports(modules) == ["metapt.runner:1 imports _private from metapt.trainer",
                                         "metapt.runner:2 imports from metapt.sub._tree, private to metapt.sub"]
    graph = _graph(modules)
    assert _cycles(graph) == [["metapt.strategy", "metapt.trainer"]]  # not runner: its way back is TYPE_CHECKING
    assert _runtime_reached(graph, "metapt.schema") == ["metapt.runner", "metapt.strategy", "metapt.trainer"]
