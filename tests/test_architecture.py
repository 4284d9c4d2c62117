"""The house's rules, read from the import graph: the core never imports the lab."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "attnfd_pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, function-level imports included, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path).split(".")
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_package else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
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
