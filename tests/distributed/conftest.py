"""Launching a worker script under torchrun: 2 processes on this machine, gloo over loopback,
one thread each, bounded in time; each rank writes its results as ``rank{r}.json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def torchrun(script: Path, out: Path, nproc: int = 2, timeout_s: float = 300.0, **env) -> list:
    """Run `script out` on `nproc` ranks (``torchrun --standalone``: a free local port) and
    return every rank's JSON results, rank 0 first; fails with the workers' output otherwise."""
    out.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "--max-restarts=0", str(script), str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        command,
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": path,
            "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo",  # loopback only
            **env,
        },
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    files = [out / f"rank{r}.json" for r in range(nproc)]
    missing = [f.name for f in files if not f.exists()]
    assert proc.returncode == 0 and not missing, (
        f"torchrun exited {proc.returncode}, missing {missing}\n{proc.stdout}\n{proc.stderr}"
    )
    return [json.loads(f.read_text()) for f in files]
