"""1 against N processes under torchrun (gloo on CPU), one thread each, at the same global batch.

    python benchmarks/distributed_scaling.py --nproc 1 2 --repeats 2 -- train.steps=300

Runs `torchrun --standalone --nproc_per_node=N train.py ...` for each N (alternating, `--repeats`
times) and prints each run's wall time, training throughput (items per second over all ranks,
evaluation excluded), final loss and L1 (where the task reports it), the speed-up over the
first N, and the load average beside each run: on a shared machine only runs measured under a
similar load compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, overrides: list[str], out: Path) -> dict:
    """One torchrun launch; its metrics.json, with the wall time of the whole launch."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "train.py", *overrides, "threads=1",
        "logging.progress=false", f"hydra.run.dir={out}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    launch = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics | {"launch_s": launch, "load": load, "event_files": _events(out)}


def _events(run_dir: Path) -> int:
    return sum(1 for _ in run_dir.rglob("events.out.tfevents.*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="train.py overrides, after --")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for nproc in args.nproc:
                out = Path(tmp) / f"n{nproc}-r{repeat}"
                rows.append((nproc, run(nproc, args.overrides, out)))
    items = next(k for k in rows[0][1] if k.endswith("_per_sec"))
    firsts = [m[items] for n, m in rows if n == args.nproc[0]]
    ref = sum(firsts) / len(firsts)  # the mean throughput of the first N
    print(f"{'N':>2} {'wall_s':>7} {'launch_s':>8} {items:>22} {'speedup':>7} {'loss':>9} "
          f"{'l1':>9} {'events':>6} {'load':>5}")  # fmt: skip
    for nproc, m in rows:
        l1 = m.get("l1", float("nan"))
        print(
            f"{nproc:>2} {m['wall_time_s']:>7.1f} {m['launch_s']:>8.1f} {m[items]:>22.1f} "
            f"{m[items] / ref:>7.2f} {m['loss']:>9.3g} {l1:>9.3g} {m['event_files']:>6} "
            f"{m['load']:>5.1f}"
        )


if __name__ == "__main__":
    main()
