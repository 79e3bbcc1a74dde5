"""Draw images from a trained DDPM: a diffusers pipeline folder, or a run of `train.py task=ddpm`.

    python sample.py runs/2026-12-08/10-00-00                        # 64 images, DDPM, all steps
    python sample.py runs/.../pipeline --scheduler dpmsolver++ --steps 25 -n 400 --seed 1
    python sample.py runs/... --class-labels 3 7 --guidance 3 --out grid.png --png-dir pngs/

The source is a pipeline folder (`DDPMPipeline.save_pretrained`, e.g. <run_dir>/pipeline) or a run
directory (its final pipeline, else the newest checkpoint's). The images go to one PNG grid and,
with --png-dir, one PNG per image. A class-conditional pipeline draws the classes given by
--class-labels (default: every class in turn), guided by --guidance (1: no guidance).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

from diffusion.config import DEFAULT_STEPS, SAMPLERS
from diffusion.pipeline import find_pipeline, load_pipeline
from diffusion.sampling import build_sampler, image_grid, sample_images, save_grid
from kinetic.checkpoint import RUN_RECORD
from kinetic.device import resolve_device
from kinetic.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ...`) and exit code 2, like train.py's."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not an int >= 1")
    return value


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a float >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sample.py",
        description="Draw images from a diffusers DDPM pipeline folder or a `train.py task=ddpm` "
        "run directory, with DDPM, DDIM or DPM-Solver++.",
    )
    parser.add_argument("source", help="a pipeline folder, or a run directory holding one")
    parser.add_argument(
        "--scheduler", choices=SAMPLERS, default="ddpm",
        help="ddpm: ancestral; ddim: deterministic; dpmsolver++: DPM-Solver++ 2M (default: ddpm)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=_positive,
        help="sampler steps (default: every training timestep for ddpm, "
        f"{DEFAULT_STEPS['ddim']} for ddim, {DEFAULT_STEPS['dpmsolver++']} for dpmsolver++)",
    )  # fmt: skip
    parser.add_argument("-n", "--num-images", type=_positive, default=64, help="default: 64")
    parser.add_argument(
        "--batch-size", type=_positive, default=256, help="images per UNet call (default: 256)"
    )
    parser.add_argument("--seed", type=int, default=0, help="fixes the images (default: 0)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    parser.add_argument(
        "--class-labels", type=int, nargs="+", metavar="LABEL",
        help="class-conditional pipelines: the classes to draw, in turn (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--guidance", type=_scale, default=1.0,
        help="class-conditional pipelines: classifier-free guidance scale (1: none; default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path,
        help="the PNG grid (default: <run_dir>/samples/sample.png for a run, else sample.png)",
    )  # fmt: skip
    parser.add_argument("--png-dir", type=Path, help="also write each image as a PNG here")
    parser.add_argument("--nrow", type=_positive, help="images per grid row (default: 8 or 10)")
    parser.add_argument("--threads", type=_positive, help="torch intra-op threads")
    return parser


def _labels(args: argparse.Namespace, classes: int | None, n: int) -> torch.Tensor | None:
    """The (n,) class labels to draw, or None for an unconditional pipeline; refuses labels
    outside the pipeline's classes, and labels or guidance for an unconditional one."""
    if classes is None:
        if args.class_labels is not None or args.guidance != 1.0:
            raise ConfigError(
                "This pipeline is unconditional: drop --class-labels and --guidance (they "
                "need a pipeline of a `task.conditional=true` run)"
            )
        return None
    wanted = args.class_labels if args.class_labels is not None else list(range(classes))
    for label in wanted:
        if not 0 <= label < classes:
            raise ConfigError(
                f"Invalid --class-labels: {label}; this pipeline's classes are 0-{classes - 1}"
            )
    return torch.tensor(wanted).repeat(-(-n // len(wanted)))[:n]


def _default_out(source: Path, folder: Path) -> Path:
    """<run_dir>/samples/sample.png when sampling a run's pipeline, else ./sample.png."""
    for run_dir in (source, folder.parent, folder.parent.parent):
        if (run_dir / RUN_RECORD).is_file():
            return run_dir / "samples" / "sample.png"
    return Path("sample.png")


def sample(args: argparse.Namespace) -> tuple[Path, str]:
    """Load the pipeline, draw the images, write the grid (and PNGs); the grid's path and a
    one-line account of what was drawn."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    folder = find_pipeline(args.source)
    pipeline = load_pipeline(folder, device)
    unet, train_scheduler = pipeline.unet, pipeline.scheduler
    steps = args.steps or DEFAULT_STEPS[args.scheduler]
    steps = steps or train_scheduler.config.num_train_timesteps  # ddpm: the whole chain
    scheduler = build_sampler(args.scheduler, train_scheduler, steps, ("--scheduler", "--steps"))
    classes = unet.config.num_class_embeds
    labels = _labels(args, None if classes is None else classes - 1, args.num_images)
    generator = torch.Generator(device).manual_seed(args.seed)
    started = time.perf_counter()
    images = sample_images(
        unet, scheduler, args.num_images, generator, args.batch_size,
        class_labels=None if labels is None else labels.to(device), guidance_scale=args.guidance,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    nrow = args.nrow or (8 if labels is None else min(10, len(set(labels.tolist()))))
    out = args.out or _default_out(Path(args.source), folder)
    save_grid(out, image_grid(images, nrow=nrow))
    if args.png_dir is not None:
        for i, image in enumerate(images):
            suffix = "" if labels is None else f"_class{int(labels[i])}"
            tile = image_grid(image[None], scale=1, pad=0)
            save_grid(args.png_dir / f"{i:06d}{suffix}.png", tile)
    account = (
        f"{args.num_images} images from {folder} with {args.scheduler} in {steps} steps"
        f"{'' if labels is None else f', guidance {args.guidance:g}'}: {seconds:.1f} s"
    )
    return out, account


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    diffusers_logging.disable_progress_bar()  # diffusers' own bar while loading a pipeline
    try:
        out, account = sample(args)
    except ConfigError as err:  # a user error: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(account)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
