"""What a run shows: TensorBoard events, a tqdm progress bar, and the final metrics.json."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class RunLogger:
    """One run's outputs, all under `run_dir` (point `tensorboard --logdir` at it or a parent)."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        progress: bool = True,
        resumed_at: int | None = None,
    ) -> None:
        """`resumed_at`: the step of the checkpoint a resumed run starts from (0: none yet).
        TensorBoard then drops the events the interrupted run wrote after it (`purge_step`),
        so each step's scalars appear once, as an uninterrupted run would have logged them;
        the progress bar starts there."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge)
        self.bar = tqdm(
            total=total_steps, initial=resumed_at or 0, disable=not progress,
            dynamic_ncols=True, leave=False,
        )  # fmt: skip
        self._postfix: dict[str, str] = {}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """`image`: uint8 or float in [0, 1], (H, W, 3)."""
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def progress(self, steps: int) -> None:
        """Advance the bar by `steps` (tqdm redraws at most a few times a second)."""
        self.bar.update(steps)

    def postfix(self, **values: float) -> None:
        """Show the latest `values` beside the bar (e.g. loss, l1)."""
        self._postfix.update({k: f"{v:.4g}" for k, v in values.items()})
        self.bar.set_postfix(self._postfix, refresh=False)

    def warn(self, step: int, message: str) -> None:
        """One warning line on the console, printed above the progress bar (which survives)."""
        tqdm.write(f"warning: step {step}: {message}", file=sys.stderr)

    def write_metrics(self, metrics: dict[str, float]) -> Path:
        """The final metrics as JSON (non-finite values written as null)."""
        path = self.run_dir / "metrics.json"
        clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
        path.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
        return path

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
