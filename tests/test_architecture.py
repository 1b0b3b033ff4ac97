"""The import graph of tltk keeps the shape docs/architecture.md draws: no circles, and
each layer imports only from its own layer or the ones below it.

The graph is read from the source with ``ast``, so it sees every ``import`` and
``from ... import`` in a module, those inside functions included: a lazy import keeps
start-up cheap, but it is still a dependency and still has to follow the layers. Two
kinds of import are left out on purpose (and imports by name in a string,
``importlib.import_module("tltk.x")`` or a ``_LAZY`` table, are read as imports):

- imports under ``if TYPE_CHECKING:``, which never run and only name types;
- the package ``__init__`` that Python runs before a submodule: it would make every
  submodule depend on its package, so ``from tltk.backbones.base import X`` is an edge to
  ``tltk.backbones.base`` only. ``from tltk.backbones import X`` is an edge to the package
  where X is a name the package defines, and to ``tltk.backbones.X`` where X is a submodule.

A new import that breaks a rule fails here; an exception that is meant to stay is
listed in ``EXCEPTIONS`` with its reason, and one that is no longer needed fails too, so
the list stays the truth.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tltk"

# ``from tltk import __version__``: the version constant, which every layer may read. It is its own node
# because the package ``tltk`` itself is the interface (its lazy re-exports reach every layer).
VERSION = "tltk.__version__"

# Layers from the bottom up, as in docs/architecture.md's table: a module's layer is the
# one of the longest prefix listed here.
LAYERS: dict[str, tuple[str, ...]] = {
    "foundations": ("tltk.errors", "tltk.fileio", "tltk.progress", "tltk.distributed", "tltk.kinds", "tltk.plugin",
                    "tltk.registry", "tltk.settings", "tltk.locking",
                    VERSION),
    "data": ("tltk.data",),
    "components": ("tltk.catalog", "tltk.backbones", "tltk.heads", "tltk.strategies",
                   "tltk.export", "tltk.weights"),
    "model": ("tltk.model", "tltk.layers", "tltk.summary"),
    "runtime": ("tltk.runtime",),
    "run files": ("tltk.rundir", "tltk.metrics"),
    "inference": ("tltk.evaluation", "tltk.predict", "tltk.tta", "tltk.explain"),
    "training": ("tltk.train",),
    "run": ("tltk.run",),
    "consumers": ("tltk.features", "tltk.viz", "tltk.sweep", "tltk.deploy", "tltk.reporting"),
    "interface": ("tltk.cli", "tltk.testing", "tltk.api", "tltk"),
}
ORDER = list(LAYERS)


# (importer, imported) pairs that break a rule and are known, each with why it stays for now.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("tltk.train.finetune", "tltk.viz.curves"):
        "finetune writes the curve PNGs itself; it should hand that to a callback or its caller",
    ("tltk.train.tensorboard", "tltk.viz.filters"):
        "the TensorBoard and snapshot callbacks draw filters with viz; finetune builds them (watch_callbacks) "
        "where its caller should pass them in",
    ("tltk.export", "tltk.predict"):
        "an exporter writes predict's Predictions, which live in predict.py rather than below the components",
    ("tltk.export.kaggle", "tltk.predict"):
        "an exporter writes predict's Predictions, which live in predict.py rather than below the components",
    ("tltk.sweep", "tltk.train.finetune"):
        "a sweep is a loop over finetune: it trains runs rather than consuming a finished one",
    ("tltk.sweep", "tltk.train.trainer"):
        "a sweep takes a TrainConfig and a Reporter to vary and pass on to finetune",
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(path, package): path for path in sorted(package.rglob("*.py"))}


def _type_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, function bodies included, ``if TYPE_CHECKING:`` blocks not."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _by_name(tree: ast.AST) -> list[str]:
    """Modules imported by a name in a string: ``importlib.import_module("tltk...")`` and the values of a
    ``_LAZY`` table of lazy re-exports (``tltk/__init__.py``): imports all the same, only deferred."""
    found: list[str] = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append(node.args[0].value)
        if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            found += [v.value for v in node.value.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return [name for name in found if name.startswith("tltk")]


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owning_module(name: str, known: dict[str, Path]) -> str | None:
    """The tltk module ``name`` refers to: itself, or the module that defines it (``a.b.func`` -> ``a.b``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """importer -> the tltk modules it imports (never itself)."""
    known = modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for target in _by_name(tree):
            owner = _owning_module(target, known)
            if owner is not None and owner != name:
                targets.add(owner)
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                named = [alias.name for alias in node.names]
            else:  # a submodule imported by name is an edge to it; any other name, to the module it comes from
                base = _absolute(node, name, is_package)
                named = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
                         if (base, alias.name) != ("tltk", "__version__")]
                if any((base, alias.name) == ("tltk", "__version__") for alias in node.names):
                    targets.add(VERSION)
            for target in named:
                owner = _owning_module(target, known) if target.startswith("tltk") else None
                if owner is not None and owner != name:
                    targets.add(owner)
        graph[name] = targets
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                circle = visit(target)
                if circle:
                    return circle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            circle = visit(start)
            if circle:
                return circle
    return None


def layer_of(module: str) -> str:
    best = max(((prefix, layer) for layer, prefixes in LAYERS.items() for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), key=lambda item: len(item[0]))
    return best[1]


def violations(graph: dict[str, set[str]]) -> dict[tuple[str, str], str]:
    """(importer, imported) -> the rule it breaks."""
    found: dict[tuple[str, str], str] = {}
    for importer, targets in graph.items():
        for target in targets:
            low, high = layer_of(importer), layer_of(target)
            if ORDER.index(high) > ORDER.index(low):
                found[(importer, target)] = f"{low} imports from the higher layer {high}"
            elif high == "training" and low not in ("training", "interface"):
                found[(importer, target)] = "only training itself and the CLI import tltk.train"
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_reads_every_kind_of_import(tmp_path: Path) -> None:
    package = tmp_path / "tltk"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": '_LAZY = {"thing": "tltk.lazy"}\n',
        "lazy.py": "",
        "top.py": "import tltk.plain\n",
        "plain.py": "",
        "typed.py": "",
        "later.py": "",
        "named.py": "",
        "version_reader.py": "from tltk import __version__\n",
        "sub/__init__.py": "",
        "sub/a.py": (
            "from typing import TYPE_CHECKING\n"
            "from . import b\n"
            "from ..plain import something\n"
            "if TYPE_CHECKING:\n    from tltk.typed import T\n"
            "def f():\n    from tltk.later import g\n"
            "def h():\n    import importlib\n    return importlib.import_module('tltk.named')\n"
        ),
        "sub/b.py": "from tltk.sub import a\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph = import_graph(package)
    assert graph["tltk.sub.a"] == {"tltk.sub.b", "tltk.plain", "tltk.later", "tltk.named"}
    assert graph["tltk.top"] == {"tltk.plain"}
    assert graph["tltk"] == {"tltk.lazy"}
    assert graph["tltk.version_reader"] == {VERSION}
    assert find_circle(graph) == ["tltk.sub.a", "tltk.sub.b", "tltk.sub.a"]


def test_the_real_graph_holds_function_level_imports(graph: dict[str, set[str]]) -> None:
    assert "tltk.backbones.timm_nets" in graph["tltk.backbones"]  # imported inside backbone_info
    assert "tltk.train.finetune" in graph["tltk"]  # a lazy re-export
    assert "tltk.model" not in graph["tltk.viz.common"]  # under TYPE_CHECKING only


def test_find_circle_names_one() -> None:
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_there_is_no_import_circle(graph: dict[str, set[str]]) -> None:
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_every_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    for module in graph:
        assert layer_of(module) in LAYERS


def test_layers_import_only_downwards(graph: dict[str, set[str]]) -> None:
    broken = {pair: rule for pair, rule in violations(graph).items() if pair not in EXCEPTIONS}
    assert not broken, "imports against docs/architecture.md's layers:\n" + "\n".join(
        f"  {importer} -> {target}: {rule}" for (importer, target), rule in sorted(broken.items()))


def test_every_listed_exception_still_exists(graph: dict[str, set[str]]) -> None:
    mended = [pair for pair in EXCEPTIONS if pair not in violations(graph)]
    assert not mended, f"no longer needed, remove from EXCEPTIONS (and docs/architecture.md): {mended}"


def test_the_rules_catch_a_violation() -> None:
    assert violations({"tltk.data.splits": {"tltk.model"}}) == {
        ("tltk.data.splits", "tltk.model"): "data imports from the higher layer model"}
    assert violations({"tltk.viz.curves": {"tltk.train.trainer"}}) == {
        ("tltk.viz.curves", "tltk.train.trainer"): "only training itself and the CLI import tltk.train"}
    assert violations({"tltk.runtime": {"tltk.run"}}) == {
        ("tltk.runtime", "tltk.run"): "runtime imports from the higher layer run"}
    assert not violations({"tltk.cli.core": {"tltk.train.finetune"}, "tltk.run": {"tltk.runtime"}})
