"""pyproject.toml declares what the code needs: the Python version (tomllib, zarr 3) and every
third-party package that attnfd_pipeline/ or stages/ imports."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = {"PIL": "pillow", "google_crc32c": "google-crc32c", "tomli_w": "tomli-w"}  # import name → distribution name, where they differ


def _imports() -> dict[str, str]:
    found: dict[str, str] = {}
    for f in sorted([*ROOT.joinpath("attnfd_pipeline").rglob("*.py"), *ROOT.joinpath("stages").rglob("*.py")]):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("attnfd_pipeline", "stages"):
                    found.setdefault(top, str(f.relative_to(ROOT)))
    return found


def test_every_direct_import_is_declared_and_python_is_3_11():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    # an import is declared in the dependencies, or in an extra for what is optional (the lab's matplotlib,
    # ONNX export, TensorBoard, object stores): those modules import it where it is used and name the extra
    extras = [d for group in project.get("optional-dependencies", {}).values() for d in group]
    declared = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower() for d in [*project["dependencies"], *extras]}
    missing = {f"{DISTRIBUTION.get(top, top)} (imported in {where})" for top, where in _imports().items()
               if DISTRIBUTION.get(top, top).lower() not in declared}
    assert not missing, f"pyproject.toml dependencies and extras lack: {sorted(missing)}"
