# ruff: noqa: E402 (the project's imports follow the sys.path line below)
"""Speed and quality of a DDPM run's samplers: DDPM (1000 steps) against DDIM and DPM-Solver++.

    python benchmarks/ddpm_samplers.py runs/<date>/<time>
    python benchmarks/ddpm_samplers.py runs/... --samplers ddpm:50 dpmsolver++:25 --seeds 1 2 3
    python benchmarks/ddpm_samplers.py runs/... --guidance 1 3      # a task.conditional=true run

The UNet and noise schedule come from the run's diffusers pipeline (`<run_dir>/pipeline`), the
held-out digits and the quality classifier from its config (kept in its checkpoints): the same
metrics as the run's evaluation (`diffusion.quality`: fd_ratio, confidence, class_entropy; for a
class-conditional run also class_match, the share the classifier assigns to the class asked
for). Each (sampler, seed) draws as many images as the held-out set (400 by default, what one
evaluation draws); seeds run in interleaved rounds so drift in the machine's speed hits every
sampler alike. Prints, per sampler (and guidance scale), the seconds per draw (mean and median
over seeds; the quality scoring, a few ms, is not included), the speed-up over the first
sampler, and each metric's mean and standard deviation over the seeds (FD from 400 samples is
noisy: compare differences with that spread). Intra-op threads: `--threads` (default 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, like the other benchmarks

from diffusion.config import SAMPLERS
from diffusion.data import load_digits_split
from diffusion.pipeline import load_pipeline
from diffusion.quality import N_CLASSES, DigitQuality, cached_classifier
from diffusion.sampling import build_sampler, sample_images
from kinetic.checkpoint import Checkpoints


def _sampler_spec(text: str) -> tuple[str, int]:
    name, _, steps = text.rpartition(":")
    if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME:STEPS with NAME one of {', '.join(SAMPLERS)}"
        )
    return name, int(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished `train.py task=ddpm` run (digits)")
    parser.add_argument(
        "--samplers", nargs="+", type=_sampler_spec,
        default=[("ddpm", 1000), ("ddpm", 50), ("ddim", 50), ("dpmsolver++", 25)],
        help="NAME:STEPS; the first is the speed baseline (default: ddpm:1000 ddpm:50 ddim:50 "
        "dpmsolver++:25)",
    )  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--guidance", nargs="+", type=float, default=[1.0, 3.0],
                        help="guidance scales (class-conditional runs only)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    found = Checkpoints(args.run_dir).load_latest()
    if found is None:
        raise SystemExit(f"error: no checkpoint in {args.run_dir / 'checkpoints'}")
    cfg = OmegaConf.create(found[1]["config"])
    if cfg.task.name != "ddpm" or cfg.data.name != "digits":
        raise SystemExit("error: needs a task=ddpm run on data=digits")
    train, labels, reference, baseline = load_digits_split(cfg.data.heldout_size, cfg.seed)
    classifier = cached_classifier(cfg.task.cache_dir, train, labels, cfg.seed)
    quality = DigitQuality(classifier, reference, baseline)
    pipeline = load_pipeline(args.run_dir)
    unet, schedule = pipeline.unet, pipeline.scheduler
    n = len(reference)
    conditional = unet.config.num_class_embeds is not None
    scales = args.guidance if conditional else [1.0]
    asked = torch.arange(n) % N_CLASSES if conditional else None
    print(
        f"{args.run_dir}: {n} images per draw, seeds {args.seeds}, {args.threads} threads, "
        f"torch {torch.__version__}, {'class-conditional' if conditional else 'unconditional'}"
    )

    rows = [(name, steps, scale) for name, steps in args.samplers for scale in scales]
    seconds: dict[tuple, list[float]] = {row: [] for row in rows}
    metrics: dict[tuple, list[dict[str, float]]] = {row: [] for row in rows}
    for seed in args.seeds:  # interleaved rounds
        for row in rows:
            name, steps, scale = row
            sampler = build_sampler(name, schedule, steps, ("--samplers", "--samplers"))
            generator = torch.Generator().manual_seed(seed)
            started = time.perf_counter()
            images = sample_images(
                unet, sampler, n, generator, class_labels=asked, guidance_scale=scale
            )
            seconds[row].append(time.perf_counter() - started)
            scores = quality(images)
            if conditional:
                scores["class_match"] = quality.class_match(images, asked)
            metrics[row].append(scores)

    keys = ["fd_ratio", "confidence", "class_entropy"] + (["class_match"] if conditional else [])
    header = f"{'sampler':<18}{'w':>4}{'s/draw mean':>13}{'median':>8}{'speed-up':>10}"
    print(header + "".join(f"{k + ' (sd)':>22}" for k in keys))
    base = statistics.mean(seconds[rows[0]])
    for row in rows:
        name, steps, scale = row
        mean = statistics.mean(seconds[row])
        line = f"{f'{name}-{steps}':<18}{scale:>4g}{mean:>13.2f}"
        line += f"{statistics.median(seconds[row]):>8.2f}{base / mean:>9.1f}x"
        for key in keys:
            values = [m[key] for m in metrics[row]]
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            line += f"{statistics.mean(values):>14.3f} ({spread:.3f})"
        print(line)


if __name__ == "__main__":
    main()
