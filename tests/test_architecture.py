"""The house's rules, read from the import graph: the core never imports the lab."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "attnfd_pipeline"


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _from_module(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    """The module a ``from … import`` statement in module ``here`` reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path) -> set[str]:
    """Every module a file imports, function-level imports included, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(node, _module_name(path), path.name == "__init__.py")
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def core_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "experiments" not in p.relative_to(PACKAGE).parts]


def test_core_never_imports_the_lab():
    offenders = {
        str(p.relative_to(PACKAGE.parent)): sorted(m for m in _imports(p) if m.startswith("attnfd_pipeline.experiments"))
        for p in core_files()
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"core modules import the lab: {offenders}"


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    # the check above is only as good as this walker: it must see imports inside functions
    src = PACKAGE / "cache" / "build.py"
    assert any(m.startswith("attnfd_pipeline.") for m in _imports(src))
    assert _module_name(PACKAGE / "cache" / "__init__.py") == "attnfd_pipeline.cache"


# ---------------------------------------------------------------------------------------------
# no import cycles, no private names across modules, no long functions


def _modules(package: Path) -> dict[str, Path]:
    return {_module_name(p, package): p for p in package.rglob("*.py")}


def _edges(path: Path, modules: dict[str, Path], package: Path = PACKAGE) -> set[str]:
    """The package modules a file imports (function-level imports included): ``from pkg import name`` is an
    edge to ``pkg.name`` when that is a module, else to ``pkg`` (whose ``__init__`` runs)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path, package)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(node, me, path.name == "__init__.py")
            found.update(f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names)
    return {m for m in found if m in modules and m != me}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components of ``graph`` (node → successors)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def import_cycles(package: Path = PACKAGE) -> list[list[str]]:
    """Every strongly connected component of more than one module in the package's import graph."""
    modules = _modules(package)
    graph = {name: _edges(path, modules, package) for name, path in modules.items()}
    return sorted(sorted(c) for c in strongly_connected(graph) if len(c) > 1)


def test_no_import_cycle():
    cycles = import_cycles()
    assert not cycles, "import cycles among attnfd_pipeline modules (one strongly connected component a line):\n" + \
        "\n".join("  " + " <-> ".join(c) for c in cycles)


def test_the_cycle_finder_sees_cycles_through_a_package_init_and_function_level_imports(tmp_path):
    pkg = tmp_path / "attnfd_pipeline"
    (pkg / "fake").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "fake" / "__init__.py").write_text("from attnfd_pipeline.fake.part import thing\n")
    # a submodule taking a name from its own package's __init__, inside a function
    (pkg / "fake" / "part.py").write_text("def thing():\n    from attnfd_pipeline.fake import CONST\n")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    import attnfd_pipeline.a\n")
    (pkg / "c.py").write_text("from attnfd_pipeline import a\n")  # imports into a cycle, is not in one
    assert import_cycles(pkg) == [["attnfd_pipeline.a", "attnfd_pipeline.b"],
                                  ["attnfd_pipeline.fake", "attnfd_pipeline.fake.part"]]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(path: Path, package: Path = PACKAGE) -> list[str]:
    """``from x import _name`` and ``Imported._name`` in one file, where ``x`` / ``Imported`` come from the
    package or the CLI: each module keeps its private names to itself (a name another module needs is public)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me, roots = _module_name(path, package), (package.name, "stages")
    imported: dict[str, str] = {}  # local name → where it comes from
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _from_module(node, me, path.name == "__init__.py")
            if module.split(".")[0] not in roots:
                continue
            for a in node.names:
                if _is_private(a.name):
                    found.append(f"line {node.lineno}: from {module} import {a.name}")
                imported[a.asname or a.name] = f"{module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in roots and a.asname:
                    imported[a.asname] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _is_private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in imported):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr} ({imported[node.value.id]})")
    return found


def test_no_private_name_used_across_modules():
    stages = PACKAGE.parent / "stages"
    offenders = {str(p.relative_to(PACKAGE.parent)): private_uses(p)
                 for p in [*PACKAGE.rglob("*.py"), *stages.rglob("*.py")]}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"private names used outside their module: {offenders}"


def test_the_private_name_check_sees_both_spellings(tmp_path):
    pkg = tmp_path / "attnfd_pipeline"
    pkg.mkdir()
    (pkg / "user.py").write_text("from attnfd_pipeline.lock import BuildLock, _helper\n"
                                 "from . import store as st\n"
                                 "def f(p):\n    return BuildLock._holder_at(p), st._cache, st.__name__, _helper\n")
    found = private_uses(pkg / "user.py", pkg)
    assert sorted(f.split(": ")[1].split(" (")[0] for f in found) == [
        "BuildLock._holder_at", "from attnfd_pipeline.lock import _helper", "st._cache"]


MAX_FUNCTION_LINES = 80


def long_functions(paths, limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """``file:function`` → lines (``end_lineno - lineno + 1``, decorators excluded) of every function or method
    longer than ``limit``."""
    out = {}
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out[f"{path.relative_to(PACKAGE.parent)}:{node.name}"] = n
    return out


def test_no_function_over_80_lines():
    files = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "stages").rglob("*.py")]
    too_long = long_functions(files)
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {too_long}"


def test_the_length_check_counts_lines():
    src = PACKAGE / "cache" / "errors.py"
    lines = {f"attnfd_pipeline/cache/errors.py:{k}": v for k, v in {"is_disk_full": 3, "disk_full_error": 5}.items()}
    assert long_functions([src], limit=2) == lines
