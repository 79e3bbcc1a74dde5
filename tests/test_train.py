"""The command line, end to end, in a subprocess as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gfn.config import run_name

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["env.height=4", "train.steps=300", "train.eval_every=100", "train.log_every=20"]


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args, "logging.progress=false"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _tags(run_dir: Path) -> dict[str, list[str]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events.Tags()


def test_hypergrid_run_logs_what_it_promises(tmp_path):
    done = _train(f"hydra.run.dir={tmp_path}", *SMALL)
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("done: hypergrid(ndim=2, height=4) tb vradam seed=0 l1=")

    tags = _tags(tmp_path)
    expected = {
        "train/loss", "train/log_z", "train/grad_norm", "perf/trajectories_per_sec",
        "optim/eta", "optim/eta_ratio", "optim/velocity_norm",
        "eval/l1", "eval/tv", "eval/jsd", "eval/log_z_error", "eval/modes_found",
        "eval/mode_regions_found",
    }  # fmt: skip
    assert expected <= set(tags["scalars"])
    assert "eval/distribution" in tags["images"]

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["trajectories"] == 300 * 16
    assert metrics["tv"] == pytest.approx(metrics["l1"] / 2)
    assert metrics["l1"] < 0.5  # 4,800 trajectories on a 4x4 grid; a random policy is near 1
    assert (tmp_path / "checkpoints" / "checkpoint_0000300.pt").is_file()
    assert "height: 4" in (tmp_path / ".hydra" / "config.yaml").read_text()
    assert "env.height=4" in (tmp_path / ".hydra" / "overrides.yaml").read_text()


def test_multirun_sweeps_optimizers(tmp_path):
    done = _train(
        "-m", f"hydra.sweep.dir={tmp_path}", "optim=vradam,adamw", "env.height=3",
        "train.steps=20", "train.eval_every=10", "train.log_every=10",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for job, name in (("0", "vradam"), ("1", "adamw")):
        assert f"name: {name}" in (tmp_path / job / ".hydra" / "config.yaml").read_text()
        assert "l1" in json.loads((tmp_path / job / "metrics.json").read_text())
    assert "optim/eta" not in _tags(tmp_path / "1")["scalars"]


def test_a_diverged_job_does_not_end_the_sweep(tmp_path):
    """Job 0 starts from a NaN log Z, so the non-finite guard stops it; job 1 still runs."""
    done = _train(
        "-m", f"hydra.sweep.dir={tmp_path}", "task.log_z_init=nan,0.0", "env.height=3",
        "train.steps=20", "train.eval_every=10", "monitor.nonfinite.max_consecutive=2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "error: step 1: 2 consecutive non-finite steps skipped" in done.stderr
    assert not (tmp_path / "0" / "metrics.json").exists()
    assert (tmp_path / "0" / "checkpoints" / "checkpoint_0000000.pt").is_file()
    assert "l1" in json.loads((tmp_path / "1" / "metrics.json").read_text())


def test_eta_ratio_is_against_the_lr_of_the_same_step(tmp_path):
    """eta_t / alpha_0 is in (0, 1] at every logged step, also where the cosine schedule has
    taken the lr to 0 after the last step."""
    done = _train(f"hydra.run.dir={tmp_path}", "env.height=3", "train.steps=40",
                  "train.log_every=10", "train.eval_every=40")  # fmt: skip
    assert done.returncode == 0, done.stderr
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    ratios = [e.value for e in events.Scalars("optim/eta_ratio")]
    assert len(ratios) == 4
    assert all(0 < r <= 1 + 1e-6 for r in ratios), ratios


def test_an_ising_run_is_named_by_its_lattice_coupling_and_temperature(tmp_path):
    done = _train(f"hydra.run.dir={tmp_path}", "env=ising", "env.L=2", "env.beta=0.3",
                  "train.steps=2", "train.eval_every=2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("done: ising(L=2, J=1.0, beta=0.3) tb vradam seed=0 l1=")


ENV_PRESETS = sorted(p.stem for p in (ROOT / "configs" / "env").glob("*.yaml"))


@pytest.mark.parametrize("preset", ENV_PRESETS)
def test_every_env_preset_names_its_parameters_in_the_run_name(preset):
    """The `done:` line's name of a run on each preset, from the composed config: the values
    the preset file sets, in `key=value` form (never an empty `name()`)."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="config", overrides=[f"env={preset}"])
    name = run_name(cfg).split(" ")[0]
    target = cfg.env._target_.rsplit(".", 1)[-1].lower()
    assert name.startswith(f"{target}(") and not name.endswith("()"), name
    raw = OmegaConf.load(ROOT / "configs" / "env" / f"{preset}.yaml")
    preset_env = raw.get("env", raw)  # graphs.yaml is a _global_ package
    for part in name[len(target) + 1 : -1].split(", "):
        key, value = part.split("=")
        assert str(preset_env[key]) == value


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", "error: optim=vradam: Invalid lr: -1; expected a float > 0"),
        ("optim.lr=abc", "error: optim=vradam: Invalid lr: 'abc'; expected a float > 0"),
        (
            "optim=adamw optim.betas=[0.9]",
            "error: optim=adamw: Invalid betas: [0.9]; expected a pair [beta1, beta2] of floats "
            "in [0, 1)",
        ),
        ("loss.name=foo", "error: Unknown loss.name: 'foo'; valid: tb, db, subtb, zvar, fm, mdb"),
        ("precision=fp64", "error: Unknown precision: 'fp64'; valid: fp32, bf16, fp16"),
        (
            "device=gpu",
            "error: Unknown device: 'gpu'; valid: auto, cpu, cuda, cuda:N, mps",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, override, message):
    done = _train(f"hydra.run.dir={tmp_path}", *override.split())
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_is_one_line_naming_what_it_has(tmp_path):
    done = _train(f"hydra.run.dir={tmp_path}", "device=cuda:1")
    assert done.returncode == 2
    available = "auto, cpu, mps" if torch.backends.mps.is_available() else "auto, cpu"
    expected = f"error: device=cuda:1 is not available on this machine; available: {available}"
    assert done.stderr.strip() == expected


def test_the_schemas_reject_a_wrong_type_before_the_run(tmp_path):
    """Hydra checks the composed config against kinetic/config.py's schemas (its own message,
    and exit code 2, a refused input like ours); tests/kinetic/test_config.py covers the schemas
    in-process."""
    done = _train(f"hydra.run.dir={tmp_path}", "train.steps=abc")
    assert done.returncode == 2
    assert "Value 'abc' of type 'str' could not be converted to Integer" in done.stderr
    assert "full_key: train.steps" in done.stderr
    assert not (tmp_path / "metrics.json").exists()
