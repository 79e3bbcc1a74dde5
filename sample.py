"""Draw samples from a trained DDPM run and write them as one PNG grid.

    python sample.py run_dir=runs/2026-11-21/10-00-00 n=64 seed=0
    python sample.py run_dir=... scheduler=ddim steps=50 ema=false out=grid.png

The UNet is rebuilt from the run's latest checkpoint (its resolved config and weights; a damaged
newest file is skipped with a warning, as `resume=auto` does); the EMA weights
are used unless `ema=false`. `scheduler` (ddpm | ddim) and `steps` default to the run's
evaluation sampler (task.sampling). The grid goes to `out` (default: <run_dir>/samples/sample.png).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

from diffusion.sampling import build_sampler, image_grid, sample_images, save_grid
from diffusion.task import build_noise_scheduler, build_unet
from kinetic.checkpoint import CHECKPOINT_DIR, Checkpoints

DEFAULTS = {
    "run_dir": None, "n": 64, "scheduler": None, "steps": None, "seed": 0, "ema": True,
    "out": None, "nrow": 8, "threads": 1,
}  # fmt: skip


def parse_args(argv: list[str]) -> dict:
    """`key=value` arguments over DEFAULTS (values parsed as YAML, like Hydra overrides)."""
    args = dict(DEFAULTS)
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULTS:
            raise ValueError(
                f"Invalid argument: {item!r}; expected key=value with key in {', '.join(DEFAULTS)}"
            )
        args[key] = yaml.safe_load(value) if value else None
    if args["run_dir"] is None:
        raise ValueError("Missing run_dir=DIR (a run directory of `train.py task=ddpm`)")
    for key in ("n", "steps", "nrow", "threads"):
        if key == "steps" and args[key] is None:
            continue
        if not isinstance(args[key], int) or args[key] < 1:
            raise ValueError(f"Invalid {key}: {args[key]!r}; expected a positive int")
    if not isinstance(args["ema"], bool):
        raise ValueError(f"Invalid ema: {args['ema']!r}; expected true or false")
    return args


def sample_run(args: dict) -> Path:
    """Load the checkpoint of `args['run_dir']`, draw `n` samples, write the grid; its path."""
    run_dir = Path(str(args["run_dir"]))
    if not run_dir.is_dir():
        raise ValueError(f"No run directory at {run_dir}")
    found = Checkpoints(run_dir).load_latest(warn=lambda line: print(f"warning: {line}"))
    if found is None:
        folder = run_dir / CHECKPOINT_DIR
        raise ValueError(f"No checkpoint in {folder} (has the run written one yet?)")
    path, checkpoint = found
    cfg = OmegaConf.create(checkpoint["config"])
    if cfg.task.name != "ddpm":
        raise ValueError(f"{path} is a task={cfg.task.name} run; sample.py needs task=ddpm")
    torch.set_num_threads(args["threads"])
    state = checkpoint["task"]
    model = build_unet(cfg.model, cfg.data.channels, cfg.data.resolution)
    model.load_state_dict(state["ema_unet"] if args["ema"] else state["unet"])
    train_scheduler = build_noise_scheduler(cfg.task)
    name = args["scheduler"] or cfg.task.sampling.scheduler
    steps = args["steps"] or cfg.task.sampling.steps
    sampler = build_sampler(str(name), train_scheduler, steps)
    generator = torch.Generator().manual_seed(args["seed"])
    images = sample_images(model, sampler, args["n"], generator)  # (n, C, H, W) in [-1, 1]
    out = Path(str(args["out"])) if args["out"] else run_dir / "samples" / "sample.png"
    return save_grid(out, image_grid(images, nrow=args["nrow"]))


def main(argv: list[str]) -> int:
    try:
        out = sample_run(parse_args(argv))
    except (ValueError, TypeError) as err:  # a user error: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
