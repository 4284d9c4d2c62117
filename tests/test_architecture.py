"""The house's rules (docs/architecture.md "House rules the tests check"): import-linter's contracts, the
module-level no-cycle rule on grimp's graph, and what no import linter states — private names stay in
their module, no function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attnfd_pipeline"


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


# ---------------------------------------------------------------------------------------------
# import-linter's contracts (pyproject.toml [tool.importlinter]): the core never imports the lab; no cycle
# between the children of any package


def lint(config_filename: str) -> int:
    """``lint-imports`` in this process; it configures logging with ``disable_existing_loggers``, which would
    silence the pipeline's logger for every later test of the session: the loggers' state is put back."""
    import logging

    loggers = [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    disabled = [lg.disabled for lg in loggers]
    try:
        return lint_imports(config_filename=config_filename, no_cache=True, no_logo=True)
    finally:
        for lg, was in zip(loggers, disabled):
            lg.disabled = was


def test_import_linter_contracts_are_kept():
    assert lint(str(ROOT / "pyproject.toml")) == 0


def test_the_contracts_see_function_level_imports_of_the_lab(tmp_path, monkeypatch):
    """The protected contract catches a core module importing the lab inside a function."""
    pkg = tmp_path / "fakepkg"
    (pkg / "experiments").mkdir(parents=True)
    for init in (pkg / "__init__.py", pkg / "experiments" / "__init__.py"):
        init.write_text("")
    (pkg / "experiments" / "report.py").write_text("from fakepkg import core\n")  # the lab may use the core
    (pkg / "core.py").write_text("def f():\n    from fakepkg.experiments import report\n")
    (tmp_path / "lint.toml").write_text(
        '[tool.importlinter]\nroot_packages = ["fakepkg"]\n\n[[tool.importlinter.contracts]]\nname = "lab"\n'
        'type = "protected"\nprotected_modules = ["fakepkg.experiments"]\nallowed_importers = []\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert lint("lint.toml") == 1
    (pkg / "core.py").write_text("def f():\n    pass\n")
    assert lint("lint.toml") == 0


# ---------------------------------------------------------------------------------------------
# no import cycles between modules: import-linter's acyclic_siblings contract works on packages (their
# descendants squashed) and cannot see a cycle through a package's own __init__ or through the imports it
# ignores, so the module-level rule stays here, on grimp's import graph (the one import-linter reads)


def import_cycles(package: str = "attnfd_pipeline") -> list[list[str]]:
    """Every strongly connected component of more than one module in the package's import graph (function-
    level imports included; ``from pkg import name`` is an import of ``pkg.name`` when that is a module, else
    of ``pkg``, whose ``__init__`` runs)."""
    graph = grimp.build_graph(package, cache_dir=None)
    upstream = {m: graph.find_upstream_modules(m) for m in graph.modules}  # what m imports, transitively
    cyclic = {m for m in graph.modules if any(m in upstream[n] for n in graph.find_modules_directly_imported_by(m))}
    components = {frozenset({m} | {n for n in cyclic if n in upstream[m] and m in upstream[n]}) for m in cyclic}
    return sorted(sorted(c) for c in components)


def test_no_import_cycle():
    cycles = import_cycles()
    assert not cycles, "import cycles among attnfd_pipeline modules (one strongly connected component a line):\n" + \
        "\n".join("  " + " <-> ".join(c) for c in cycles)


def test_the_cycle_finder_sees_cycles_through_a_package_init_and_function_level_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "fakecycles"
    (pkg / "fake").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "fake" / "__init__.py").write_text("from fakecycles.fake.part import thing\n")
    # a submodule taking a name from its own package's __init__, inside a function
    (pkg / "fake" / "part.py").write_text("def thing():\n    from fakecycles.fake import CONST\n")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    import fakecycles.a\n")
    (pkg / "c.py").write_text("from fakecycles import a\n")  # imports into a cycle, is not in one
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("fakecycles") == [["fakecycles.a", "fakecycles.b"],
                                           ["fakecycles.fake", "fakecycles.fake.part"]]


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


def test_no_test_file_imports_another():
    """Shared fakes live in tests/fakes.py and fixtures in tests/conftest.py (docs/architecture.md): a test
    module importing another would run the other's module-level code and hide where a helper lives."""
    tests = PACKAGE.parent / "tests"
    names = {p.stem for p in tests.glob("test_*.py")}
    found = []
    for path in tests.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [f"{path.name} imports {m}" for m in mods if m.split(".")[0] in names]
        found += [f"{path.name} imports {n} in a string" for n in names if f"from {n} import" in path.read_text()]
    assert not found, found
