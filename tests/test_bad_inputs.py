"""Every bad input is refused before work starts: exit code 2, one message naming the key or
value, and an existing run directory left exactly as it was.

The command line runs in-process (`runpy`, as `python train.py ...` runs it), so the table
stays fast; each case runs against a run directory that already holds a finished run (checks
made before the run directory's own) or one that holds only a user's notes (refusals found
while building the task, which come after it).
"""

from __future__ import annotations

import contextlib
import io
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["logging.progress=false"]
TINY = ["env.height=3", "train.steps=4", "train.eval_every=4", *COMMON]

BROKEN_ENV = '''
import torch
from envs.hypergrid import HyperGrid


class BrokenGrid(HyperGrid):
    """A HyperGrid whose log_reward forgets the batch dimension."""

    def log_reward(self, states):
        return super().log_reward(states).sum()
'''


def cli(*args: str) -> tuple[int, str]:
    """`python train.py *args` in this process: (exit code, stderr)."""
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["train.py", *args]
    err = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as exit:
        code = exit.code
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    return code, err.getvalue()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """`run`: a finished run's directory; `notes`: a directory with a user's file only; data
    folders and files for the data and resume cases."""
    root = tmp_path_factory.mktemp("bad_inputs")
    code, err = cli(f"hydra.run.dir={root / 'run'}", *TINY, "train.checkpoint_every=2")
    assert code == 0, err
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("my notes")
    (root / "empty").mkdir()
    (root / "broken_images").mkdir()
    (root / "broken_images" / "a.png").write_bytes(b"not a png")
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")
    (root / "broken_env.py").write_text(BROKEN_ENV)
    return {"root": root, "run": root / "run", "notes": root / "notes"}


DDPM = "task=ddpm"
# (overrides, the directory they run against, the expected stderr: exact, or its start "...").
CASES = [
    # The inputs that gave a traceback, a wrong run or a misleading message.
    (["train.steps=0"], "run", "Invalid train.steps: 0; expected an int >= 1"),
    (["train.log_every=0"], "run", "Invalid train.log_every: 0; expected an int >= 1"),
    (["train.eval_every=-1"], "run", "Invalid train.eval_every: -1; expected an int >= 0"),
    (["threads=0"], "run", "Invalid threads: 0; expected an int >= 1"),
    ([DDPM, "data.resolution=0"], "run", "Invalid data.resolution: 0; expected an int >= 1"),
    (
        [DDPM, "task.sampling.grid_samples=0"], "run",
        "Invalid task.sampling.grid_samples: 0; expected an int >= 1",
    ),
    (
        [DDPM, "data.channels=3"], "run",
        "Invalid data.channels: 3 for data=digits; the digits are grayscale, so data.channels "
        "must be 1 (3 channels need data=folder)",
    ),
    (["task.replay.capacity=-5"], "run", "Invalid task.replay.capacity: -5; expected an int >= 0"),
    (["train.clip_grad_norm=-1"], "run", "Invalid train.clip_grad_norm: -1; expected a float >= 0"),
    (["task.log_z_beta3=-1"], "run", "Invalid task.log_z_beta3: -1; expected a float >= 0"),
    (["task.batch_size=0"], "run", "Invalid task.batch_size: 0; expected an int >= 1"),
    (["env.height=0"], "notes", "Invalid env.height: 0; expected an int >= 2"),
    # Ranges of documented keys.
    (["task.epsilon=1.5"], "run", "Invalid task.epsilon: 1.5; expected a float in [0, 1]"),
    (["task.temperature=0"], "run", "Invalid task.temperature: 0; expected a float > 0"),
    (
        ["task.replay.capacity=10", "task.replay.fraction=1.5"], "run",
        "Invalid task.replay.fraction: 1.5; expected a float in [0, 1)",
    ),
    (
        ["train.warmup_steps=5000"], "run",
        "Invalid train.warmup_steps: 5000; expected an int in [0, 3000]",
    ),
    (
        ["train.checkpoint_every=-1"], "run",
        "Invalid train.checkpoint_every: -1; expected an int >= 0",
    ),
    (
        ["train.keep_checkpoints=0"], "run",
        "Invalid train.keep_checkpoints: 0; expected an int >= 1",
    ),
    (["seed=-1"], "run", "Invalid seed: -1; expected an int in [0, 9223372036854775807]"),
    (["model.hidden=0"], "run", "Invalid model.hidden: 0; expected an int >= 1"),
    (
        ["model=gnn", "env=graphs_tiny", "model.n_layers=-1"], "run",
        "Invalid model.n_layers: -1; expected an int >= 0",
    ),
    (["loss=subtb", "loss.lamda=-1"], "run", "Invalid loss.lamda: -1; expected a float >= 0"),
    (
        ["train.lr_schedule=step"], "run",
        "Unknown train.lr_schedule: 'step'; valid: constant, linear, cosine",
    ),
    (
        [DDPM, "task.sampling.steps=0"], "run",
        "Invalid task.sampling.steps: 0; expected an int in [1, 1000]",
    ),
    ([DDPM, "task.ema.decay=2"], "run", "Invalid task.ema.decay: 2; expected a float in [0, 1]"),
    (["monitor.window=1"], "run", "Invalid monitor.window: 1; expected an int >= 2"),
    # Optimizers refuse their own arguments.
    (["optim.lr=-1"], "notes", "optim=vradam: Invalid lr: -1; expected a float > 0"),
    (
        ["optim.betas=[0.9,1.5]"], "notes",
        "optim=vradam: Invalid betas[1]: 1.5; expected a float in [0, 1)",
    ),
    (
        ["optim=adamw", "optim.lr=-1"], "notes",
        "optim=adamw: Invalid lr: -1; expected a float > 0",
    ),
    (
        ["optim=adamw", "optim.betas=[0.9]"], "notes",
        "optim=adamw: Invalid betas: [0.9]; expected a pair [beta1, beta2] of floats in [0, 1)",
    ),
    (
        ["optim=kadam", "optim.lr=abc"], "notes",
        "optim=kadam: Invalid lr: 'abc'; expected a float > 0",
    ),
    (["optim=sgdp", "optim.lr=0"], "notes",
     "optim=sgdp: Invalid lr: 0; expected a float > 0"),
    (
        ["optim=sgdp", "+optim.foo=1"], "notes",
        "Unknown key for optimizer 'sgdp': foo; valid keys: lr, momentum, dampening, "
        "weight_decay, nesterov, eps, delta, wd_ratio",
    ),
    (
        ["task.name=nowhere.Task"], "run",
        "...Unknown task: 'nowhere.Task'; not registered, and not importable (No module named "
        "'nowhere'); available: ddpm, gfn",
    ),
    # Unknown options and keys: Hydra's message, our exit code.
    (["optim=nope"], "run", "...In 'config': Could not find 'optim/nope'"),
    (["train.foo=1"], "run", "...Could not override 'train.foo'."),
    (["env.heigth=3"], "run", "...Could not override 'env.heigth'."),
    (["+env.heigth=3"], "notes", "...env=HyperGrid: HyperGrid does not accept these keys"),
    (["env._target_=envs.nope.Grid"], "notes", "...env._target_=envs.nope.Grid cannot be imported"),
    # Continuous, conditional and structure-learning environments; local search.
    (["env=box", "env.delta=1.5"], "notes", "Invalid env.delta: 1.5; expected a float in (0, 1)"),
    (["env=box", "env.delta=0"], "notes", "Invalid env.delta: 0; expected a float in (0, 1)"),
    (
        ["env=conditional_hypergrid", "env.eval_betas=[0.5,3.0]"], "notes",
        "Invalid env.eval_betas: 3 lies outside the training range [env.beta_min, env.beta_max] "
        "= [0.5, 2]",
    ),
    (
        ["env=conditional_hypergrid", "loss=fm"], "notes",
        "loss=fm is not available on the conditional environment ConditionalHyperGrid; valid: "
        "tb, db, subtb, zvar",
    ),
    (
        ["task.local_search.refinements=2", "task.local_search.k=15"], "notes",
        "task.local_search.k=15 is longer than any trajectory of HyperGrid (max_steps=14); "
        "valid: 1..14",
    ),
    (
        ["task.local_search.acceptance=best"], "run",
        "Unknown task.local_search.acceptance: 'best'; valid: mh, greedy",
    ),
    (
        ["env=dag", "env.n_nodes=7", "env.exact=true"], "notes",
        "env.exact=true needs env.n_nodes <= 5, got 7: there are 1,138,779,265 DAGs on 7 nodes; "
        "set env.exact=false (sampled evaluation)",
    ),
    # Environments failing check_env.
    (
        ["env._target_=broken_env.BrokenGrid"], "notes",
        "...BrokenGrid does not meet the Env contract; check_env found",
    ),
    # Data folders: missing, empty, unreadable.
    ([DDPM, "data=folder", "data.path={root}/missing"], "run",
     "data.path={root}/missing does not exist; expected a folder of PNG/JPEG images"),
    ([DDPM, "data=folder", "data.path={root}/empty"], "run",
     "No images in data.path={root}/empty; expected files ending in .png, .jpg, .jpeg"),
    ([DDPM, "data=folder", "data.path={root}/broken_images"], "notes",
     "No readable image in data.path={root}/broken_images; cannot read {root}/broken_images/a.png"),
    # Run directories and checkpoints.
    ([], "run", "The run directory {run} already holds a run; pass resume=auto to continue it, "
     "overwrite=true to replace it, or choose another hydra.run.dir"),
    (["resume=auto", "overwrite=true"], "run",
     "resume=auto and overwrite=true contradict each other: resume continues the run in the "
     "run directory, overwrite starts a new one there; pass one of them"),
    (["resume=auto", "env.height=5"], "run",
     "Cannot resume the run in {run} with a different task, environment or model: "
     "env.height: 3 in the checkpoint, 5 now"),
    (["resume={root}/missing.pt", "env.height=3"], "run",
     "resume={root}/missing.pt: no such checkpoint file (resume=auto picks the latest "
     "checkpoint of the run directory)"),
    (["resume={root}/corrupt.pt"], "notes", "...Checkpoint {root}/corrupt.pt cannot be read: "),
]  # fmt: skip


def test_the_table_covers_at_least_thirty_inputs():
    assert len(CASES) >= 30


@pytest.mark.parametrize(
    ("overrides", "where", "message"),
    CASES,
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_a_bad_input_is_refused_with_exit_code_2_and_nothing_written(
    dirs, overrides, where, message
):
    root, run_dir = dirs["root"], dirs[where]
    sys.path.insert(0, str(root))  # broken_env.py
    fill = {"{root}": str(root), "{run}": str(run_dir)}
    for key, value in fill.items():
        overrides = [o.replace(key, value) for o in overrides]
        message = message.replace(key, value)
    before = snapshot(run_dir)
    try:
        code, err = cli(f"hydra.run.dir={run_dir}", *COMMON, *overrides)
    finally:
        sys.path.remove(str(root))
    assert code == 2, err
    if message.startswith("..."):
        assert message[3:] in err
    else:
        assert err.strip().splitlines()[-1] == f"error: {message}"
        assert "Traceback" not in err
    assert snapshot(run_dir) == before  # nothing in the run directory changed


def test_debug_shows_the_traceback_of_a_refusal(dirs):
    code, err = cli(f"hydra.run.dir={dirs['run']}", "train.steps=0", "debug=true")
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == "error: Invalid train.steps: 0; expected an int >= 1"


def test_an_internal_error_keeps_its_traceback_and_is_not_a_user_error(tmp_path, monkeypatch):
    from gfn.task import GFlowNetTask

    def broken(self, step, model=None):
        raise ValueError("an internal bug")

    monkeypatch.setattr(GFlowNetTask, "loss", broken)
    code, err = cli(f"hydra.run.dir={tmp_path}", *TINY)
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == "ValueError: an internal bug"
