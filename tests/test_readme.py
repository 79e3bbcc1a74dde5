"""README's "Using kinetic from Python" example, run exactly as written."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_example() -> str:
    """The python code block of README's "Using kinetic from Python" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using kinetic from Python", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"^```python\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)
    assert match is not None, "README's Python section has no python block"
    return match.group(1)


def test_python_example_trains_hypergrid(tmp_path, monkeypatch, capsys):
    script = tmp_path / "example.py"
    script.write_text(_python_example())
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(script), run_name="__main__")
    metrics = namespace["metrics"]
    assert metrics["steps"] == 300 and metrics["trajectories"] == 300 * 16
    # An untrained policy on the 8x8 grid is at L1 ~1.2; 4,800 trajectories get well below.
    assert metrics["l1"] < 0.4, metrics
    assert metrics["tv"] == pytest.approx(metrics["l1"] / 2)
    assert capsys.readouterr().out.startswith(f"L1 = {metrics['l1']:.3f}, log Z error = ")
    assert list(tmp_path.iterdir()) == [script]  # no logger: no files written
