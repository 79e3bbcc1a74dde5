"""`train.py task=ddpm` and `sample.py`, end to end, in a subprocess as a user runs them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "task=ddpm", "model=unet_tiny", "data.heldout_size=300", "train.steps=20",
    "train.eval_every=10", "train.log_every=5", "train.warmup_steps=2",
    "task.sampling.steps=3", "threads=1", "logging.progress=false",
]  # fmt: skip


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, classifier_cache):
    path = tmp_path_factory.mktemp("ddpm_run")
    done = _run("train.py", *TINY, f"hydra.run.dir={path}", f"task.cache_dir={classifier_cache}")
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("done: ddpm digits vradam seed=0 loss=")
    for key in ("fd=", "fd_ratio=", "confidence=", "class_entropy=", "images_per_sec="):
        assert key in summary
    return path


def test_train_logs_metrics_images_and_checkpoint(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"fd", "fd_real", "fd_ratio", "confidence", "class_entropy", "loss"} <= set(metrics)
    assert metrics["images"] == 20 * 128
    assert metrics["fd_ratio"] == pytest.approx(metrics["fd"] / metrics["fd_real"])
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "step_000010.png", "step_000020.png",
    ]  # fmt: skip
    assert (run_dir / "checkpoints" / "checkpoint_0000020.pt").is_file()

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    expected = {
        "train/loss", "train/lr", "train/grad_norm", "perf/images_per_sec",
        "optim/eta", "optim/eta_ratio", "eval/fd", "eval/fd_real", "eval/fd_ratio",
        "eval/confidence", "eval/class_entropy",
    }  # fmt: skip
    assert expected <= set(events.Tags()["scalars"])
    assert "eval/samples" in events.Tags()["images"]
    lrs = [s.value for s in events.Scalars("train/lr")]
    assert lrs[-1] < max(lrs)  # warm-up, then the cosine decay


def test_train_writes_a_pipeline_beside_each_kept_checkpoint_and_at_the_end(run_dir):
    folders = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert folders == ["pipeline_0000020"]  # checkpoint_every defaults to the run's end
    for folder in (run_dir / "pipeline", run_dir / "checkpoints" / folders[0]):
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == (
            "DDPMPipeline"
        )
        assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["beta_schedule"] == "squaredcos_cap_v2"
        assert scheduler["timestep_spacing"] == "trailing"


@pytest.mark.parametrize("source", ["run", "pipeline"])
def test_sample_writes_a_grid_and_pngs(run_dir, tmp_path, source):
    out, pngs = tmp_path / "grid.png", tmp_path / "pngs"
    path = run_dir if source == "run" else run_dir / "pipeline"
    done = _run(
        "sample.py", str(path), "-n", "12", "--nrow", "4", "--scheduler", "ddim", "--steps", "3",
        "--out", str(out), "--png-dir", str(pngs),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith(f"12 images from {run_dir / 'pipeline'} with ddim in 3 steps: ")
    assert lines[1] == f"wrote {out}"
    width, height = Image.open(out).size
    assert (width, height) == ((4 * 9 + 1) * 4, (3 * 9 + 1) * 4)  # 8x8 tiles, 1-pixel gaps, x4
    assert sorted(p.name for p in pngs.iterdir()) == [f"{i:06d}.png" for i in range(12)]
    assert Image.open(pngs / "000000.png").size == (8, 8)


def test_sample_help_lists_the_schedulers():
    done = _run("sample.py", "--help")
    assert done.returncode == 0
    assert "{ddpm,ddim,dpmsolver++}" in done.stdout and "--guidance" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/run"], "error: No such pipeline folder or run directory: /nonexistent/run"),
        (
            ["RUN", "--scheduler", "euler"],
            "error: argument --scheduler: invalid choice: 'euler' (choose from 'ddpm', 'ddim', "
            "'dpmsolver++') (see --help)",
        ),
        (["RUN", "--steps", "0"], "error: argument --steps: 0 is not an int >= 1 (see --help)"),
        (["RUN", "--steps", "1001"], "error: Invalid --steps: 1001; expected an int in [1, 1000]"),
        (
            ["RUN", "--class-labels", "3"],
            "error: This pipeline is unconditional: drop --class-labels and --guidance (they "
            "need a pipeline of a `task.conditional=true` run)",
        ),
        (
            ["RUN", "--guidance", "-1"],
            "error: argument --guidance: '-1' is not a float >= 0 (see --help)",
        ),
    ],
)
def test_sample_errors_are_one_line_and_exit_code_2(run_dir, args, message):
    done = _run("sample.py", *[str(run_dir) if a == "RUN" else a for a in args])
    assert done.returncode == 2
    assert done.stderr.strip() == message


def test_sample_refuses_a_folder_without_a_pipeline(tmp_path):
    done = _run("sample.py", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: {tmp_path} is not a diffusers pipeline folder (no model_index.json) nor a DDPM "
        "run directory holding one; pass <run_dir>/pipeline or the run directory of `train.py "
        "task=ddpm`"
    )


def test_a_short_bf16_run_on_the_cpu_finishes_with_finite_metrics(tmp_path, classifier_cache):
    """The preset's 200-step warm-up is cut to a shorter run, bf16 autocast trains on the CPU,
    and a CPU without bf16 instructions is told so in one warning line."""
    from kinetic.precision import cpu_has_bf16

    run = tmp_path / "run"
    done = _run(
        "train.py", "task=ddpm", "model=unet_tiny", "data.heldout_size=300", "device=cpu",
        "precision=bf16", "train.steps=20", "train.eval_every=20", "task.sampling.steps=3",
        "threads=1", "logging.progress=false", f"task.cache_dir={classifier_cache}",
        f"hydra.run.dir={run}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("loss", "fd", "fd_ratio", "confidence"))
    assert "warmup_steps: 20\n" in (run / ".hydra" / "config.yaml").read_text()
    warned = "warning: precision=bf16 on this CPU (no AVX512-BF16 or AMX) is emulated"
    assert (warned in done.stderr) == (not cpu_has_bf16())


def test_the_ddpm_preset_warms_up_200_steps_at_its_own_length():
    from hydra import compose, initialize_config_dir

    import diffusion.config  # noqa: F401  (registers task=ddpm's schemas)

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        assert compose("config", ["task=ddpm"]).train.warmup_steps == 200
        assert compose("config", ["task=ddpm", "train.steps=50"]).train.warmup_steps == 50
        explicit = ["task=ddpm", "train.steps=50", "train.warmup_steps=80"]
        assert compose("config", explicit).train.warmup_steps == 80  # refused before a run


def test_train_data_error_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _run("train.py", "task=ddpm", "data=folder", f"data.path={empty}",
                f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: No images in data.path={empty}; expected files ending in .png, .jpg, .jpeg"
    )
