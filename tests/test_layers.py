"""The layers above the import contracts: no package imports an entry point.

`lint-imports` (pyproject.toml) checks the packages' layers, their independence and that no
package's modules import each other in a circle; the entry points (train.py, sample.py,
benchmarks/, study/) are scripts, which import-linter cannot hold, so this test reads every
module's imports, function-level ones included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("optim", "kinetic", "envs", "gfn", "diffusion")
ENTRY_POINTS = {"train", "sample", "benchmarks", "study", "examples", "tests"}


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_package_imports_an_entry_point():
    crossings = [
        f"{path.relative_to(ROOT)} imports {', '.join(sorted(_imported(path) & ENTRY_POINTS))}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if _imported(path) & ENTRY_POINTS
    ]
    assert crossings == []


def test_the_core_and_the_optimizers_import_no_task_and_no_environment():
    """The layers contract's main clause, read without import-linter: kinetic/ and optim/ name
    none of gfn, diffusion, envs (at module level or inside a function)."""
    crossings = [
        str(path.relative_to(ROOT))
        for package in ("kinetic", "optim")
        for path in sorted((ROOT / package).rglob("*.py"))
        if _imported(path) & {"gfn", "diffusion", "envs"}
    ]
    assert crossings == []
