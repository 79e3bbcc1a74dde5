"""Run under torchrun by test_sharded_vradam.py: VRAdam on FSDP2-sharded parameters against the
single-process optimizer, every case in one launch, and kinetic.distributed's helpers across
the ranks (each rank writes ``rank{r}.json``).

Each rank trains a model sharded with ``fully_shard`` on its half of every global batch, and
beside it the unsharded model on the whole batch with VRAdam ``impl="reference"`` in this one
process: FSDP averages the two halves' gradients, so both see the gradient of the same mean
loss, and sharded VRAdam must take the unsharded steps.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from kinetic import distributed
from kinetic.stability.monitors import velocity_scalars
from optim import vradam_triton
from optim.vradam import VRAdam

STEPS = 20
GLOBAL_BATCH = 16
# beta3 per measure, so that the gate is active (eta_t well inside (lr / (1 + lr_cutoff), lr)).
BETA3 = {"sum": 20.0, "mean": 2e3, "precond": 2.0}
CASES = [
    (impl, velocity, norm)
    for impl in ("reference", "fused")
    for velocity in ("sum", "mean", "precond")
    for norm in ("global", "group")
]
# The interpreted Triton kernels are slow: two cases cover both reductions and all code paths.
CASES += [("triton", "sum", "global"), ("triton", "precond", "group")]
# A model of 85k parameters, where a float32 sum of the "precond" measure's ~1-sized terms
# drifts by ~1e-5 with the order of the additions (the shards add in another order).
WIDE_CASES = [
    (impl, "precond", norm) for impl in ("reference", "fused") for norm in ("global", "group")
]


def make_model(wide: bool = False) -> nn.Sequential:
    """Three layers with odd widths, so that the shards of two ranks differ in size; `wide`:
    64 -> 256 -> 256 -> 9 with ReLUs (85k parameters)."""
    torch.manual_seed(0)
    if wide:
        return nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 9)
        )
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3))


def param_groups(model: nn.Sequential) -> list[dict]:
    """Two groups: weights (decayed) and biases (their own lr)."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [dict(params=weights, weight_decay=0.1), dict(params=biases, lr=5e-3)]


def shard(model: nn.Sequential) -> nn.Sequential:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def run_case(
    impl: str, velocity: str, norm: str, rank: int, world: int, wide: bool = False
) -> dict:
    options = dict(lr=1e-2, beta3=BETA3[velocity], velocity=velocity, norm=norm)
    sharded = shard(make_model(wide))
    single = make_model(wide)
    inputs, outputs = single[0].in_features, single[-1].out_features
    opt = VRAdam(param_groups(sharded), impl=impl, **options)
    ref = VRAdam(param_groups(single), impl="reference", **options)
    gen = torch.Generator().manual_seed(1)
    param_err = measure_err = eta_err = monitor_err = 0.0
    ratios, measures = [], []
    for _ in range(10 if wide else STEPS):
        x = torch.randn(GLOBAL_BATCH, inputs, generator=gen)
        y = torch.randn(GLOBAL_BATCH, outputs, generator=gen)
        mine = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        for model, optimizer, xb, yb in ((sharded, opt, x[mine], y[mine]), (single, ref, x, y)):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(xb), yb).backward()
            optimizer.step()
        for p, q in zip(sharded.parameters(), single.parameters(), strict=True):
            param_err = max(param_err, (p.full_tensor() - q).abs().max().item())
        s, s_ref = opt.last_velocity_measure, ref.last_velocity_measure
        measure_err = max(measure_err, ((s - s_ref).abs() / s_ref.abs()).max().item())
        eta_err = max(eta_err, (opt.last_lr_tensor - ref.last_lr_tensor).abs().max().item())
        watched, truth = velocity_scalars(opt, 1e-2), velocity_scalars(ref, 1e-2)
        monitor_err = max(monitor_err, *((watched[k] - truth[k]).abs().item() for k in truth))
        ratios.append(ref.last_lr_tensor[0].item() / 1e-2)
        measures.append(s.tolist())
    return dict(
        param_err=param_err,
        measure_rel_err=measure_err,
        eta_err=eta_err,
        monitor_err=monitor_err,
        eta_ratio_min=min(ratios),
        eta_ratio_max=max(ratios),
        plain_outputs=type(opt.last_velocity_measure) is torch.Tensor,
        local_numel=sum(p.to_local().numel() for p in sharded.parameters()),
        global_numel=sum(p.numel() for p in sharded.parameters()),
        final=[p.full_tensor().tolist() for p in sharded.parameters()],
        measures=measures,
    )


def refusals() -> dict:
    """The messages of the layouts sharded VRAdam refuses."""
    out = {}
    mixed = shard(make_model())
    extra = nn.Parameter(torch.zeros(3))
    opt = VRAdam([*mixed.parameters(), extra], impl="fused")
    mixed(torch.ones(2, 5)).sum().add(extra.sum()).backward()
    try:
        opt.step()
        out["mixed"] = None
    except TypeError as e:
        out["mixed"] = str(e)
    return out


def main() -> None:
    torch.set_num_threads(1)
    distributed.init_from_env("cpu", timeout_s=120)
    rank, world = distributed.rank(), distributed.world_size()
    results = {"world": world, "cases": {}, "refusals": refusals()}
    results["helpers"] = dict(
        agreed=distributed.agree(f"run-dir-of-rank-{rank}"),
        seed=distributed.rank_seed(7),
        main=distributed.is_main_process(),
        mean=distributed.mean_over_ranks(torch.tensor(float(rank + 1))).item(),
        ddp=type(distributed.data_parallel(nn.Linear(2, 2))).__name__,
    )
    for impl, velocity, norm in CASES:
        key = f"{impl}-{velocity}-{norm}"
        if impl == "triton" and not (vradam_triton.available() and vradam_triton.interpreted()):
            results["cases"][key] = "skipped: triton needs TRITON_INTERPRET=1 on CPU"
            continue
        results["cases"][key] = run_case(impl, velocity, norm, rank, world)
    for impl, velocity, norm in WIDE_CASES:
        results["cases"][f"wide-{impl}-{velocity}-{norm}"] = run_case(
            impl, velocity, norm, rank, world, wide=True
        )
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(results))
    distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
