"""benchmarks/gpu_check.py stays working: its CPU half runs here, and its sync recorder blames
the right function."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check(load_benchmark):
    return load_benchmark("gpu_check")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU half runs where there is no CUDA")
def test_the_cpu_half_runs_and_passes():
    """What a user without a GPU sees: it says so, times the steps on the CPU, exits 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "No CUDA device here: running the CPU half" in out
    for label in ("train gfn-fp32", "train gfn-bf16", "train ddpm-fp32", "train ddpm-bf16"):
        assert label in out
    assert "hypergrid  bf16:" in out and "ddpm       bf16:" in out  # train.py device=cpu runs
    assert "gpu_check: all checks passed" in out


def allowed_sync() -> None:
    warnings.warn("called a synchronizing CUDA operation", stacklevel=1)


def stray_sync() -> None:
    warnings.warn("called a synchronizing CUDA operation", stacklevel=1)


def test_the_sync_recorder_blames_the_innermost_function_of_the_repository(gpu_check, monkeypatch):
    """A sync is attributed to the repository function it happened in; only the ones outside
    the allow-list are reported, each once, with file and line."""
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    here = Path(__file__).relative_to(ROOT).as_posix()
    monkeypatch.setattr(gpu_check, "ALLOWED_SYNCS", {(here, "allowed_sync"): "test"})
    with gpu_check.SyncRecorder() as recorder:
        allowed_sync()
        stray_sync()
        stray_sync()
        warnings.warn("some other warning", stacklevel=1)  # not a sync: ignored
    assert [(f, fn) for f, fn, _ in recorder.syncs] == [
        (here, "allowed_sync"),
        (here, "stray_sync"),
        (here, "stray_sync"),
    ]
    (bad,) = recorder.unexpected()
    assert bad.startswith(f"{here}:") and bad.endswith(" (stray_sync)")
