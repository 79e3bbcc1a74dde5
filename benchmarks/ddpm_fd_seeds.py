"""How noisy is a DDPM run's Fréchet distance? Re-sample its final EMA weights with several seeds.

    python benchmarks/ddpm_fd_seeds.py runs/<date>/<time> --seeds 1 2 3 4 5 --threads 2

Each seed draws as many samples as the held-out reference set, with the run's own evaluation
sampler, and is scored with the run's quality classifier (rebuilt from the cache, or retrained).
Seed `seed + 1` of the run is what its final evaluation drew. Prints each seed's metrics and the
median fd_ratio.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffusion.data import load_digits_split
from diffusion.quality import DigitQuality, cached_classifier
from diffusion.sampling import build_sampler, sample_images
from diffusion.task import build_noise_scheduler, build_unet
from kinetic.checkpoint import Checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished `train.py task=ddpm` run (digits)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    _, checkpoint = Checkpoints(args.run_dir).load_latest() or (None, None)
    if checkpoint is None:
        raise SystemExit(f"error: no checkpoint in {args.run_dir / 'checkpoints'}")
    cfg = OmegaConf.create(checkpoint["config"])
    if cfg.task.name != "ddpm" or cfg.data.name != "digits":
        raise SystemExit("error: needs a task=ddpm run on data=digits")
    train, labels, reference, baseline = load_digits_split(cfg.data.heldout_size, cfg.seed)
    classifier = cached_classifier(cfg.task.cache_dir, train, labels, cfg.seed)
    quality = DigitQuality(classifier, reference, baseline)
    model = build_unet(cfg.model, cfg.data.channels, cfg.data.resolution)
    model.load_state_dict(checkpoint["task"]["ema_unet"])
    noise = build_noise_scheduler(cfg.task)
    ratios = []
    for seed in args.seeds:
        sampler = build_sampler(cfg.task.sampling.scheduler, noise, cfg.task.sampling.steps)
        samples = sample_images(model, sampler, len(reference), torch.Generator().manual_seed(seed))
        metrics = quality(samples)
        ratios.append(metrics["fd_ratio"])
        print(f"seed {seed}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
    print(f"fd_ratio median {statistics.median(ratios):.4g} over {len(ratios)} sampler seeds")


if __name__ == "__main__":
    main()
