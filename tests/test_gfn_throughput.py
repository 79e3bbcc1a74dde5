"""benchmarks/gfn_throughput.py's FLOP count: the rows it records and the FLOPs it derives from
them match a closed form and torch's own FLOP counter, and its matmul replay does that work."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gfn.policies import MLPPolicy
from gfn.task import RECORD_PASS_MIN_BATCH


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("gfn_throughput")


def test_flops_of_a_hand_built_case_match_the_closed_form(bench):
    """Layers 3->5, 5->5, 5->7 (4 forward, 3 backward logits): per row 2(15 + 25 + 35) = 150
    FLOPs forward; a backward row costs 150 for the weight gradients and 2(25 + 35) = 120 for
    the input gradients (none for the first layer, whose input needs none)."""
    torch.manual_seed(0)
    policy = MLPPolicy(n_features=3, n_actions=4, hidden=5, n_layers=2, backward="learned")
    counter = bench.RowCounter(policy)
    assert counter.layers == [(3, 5), (5, 5), (5, 7)]
    with torch.inference_mode():
        policy(torch.randn(4, 3))  # sampling: 4 rows, no autograd
        policy(torch.randn(2, 3))
    policy(torch.randn(6, 3)).pf_logits.sum().backward()  # the loss: 6 rows
    with torch.no_grad():
        _, recorded = policy.record(torch.randn(5, 3))  # a recorded sampling pass: 5 rows
    policy.replay(recorded).pf_logits.sum().backward()  # backpropagated without a forward
    with counter.paused():
        policy(torch.randn(100, 3))  # not recorded
    assert counter.calls == [
        (4, True, False, False),
        (2, True, False, False),
        (6, True, True, False),
        (5, True, False, False),
        (5, False, True, False),
    ]
    flops = counter.flops(counter.calls)
    assert flops["forward_rows"] == 17 and flops["backward_rows"] == 11
    assert flops["forward"] == 17 * 150
    assert flops["backward"] == 11 * (150 + 120)
    assert flops["total"] == 17 * 150 + 11 * 270
    # An input that needs a gradient adds the first layer's input gradient: 2 * 15 per row.
    counter.calls.clear()
    policy(torch.randn(6, 3, requires_grad=True)).pf_logits.sum().backward()
    assert counter.flops(counter.calls)["backward"] == 6 * (150 + 150)


@pytest.mark.parametrize("record", [True, False])
def test_flops_of_a_training_iteration_match_torch_flop_counter(bench, record):
    """A real iteration (sample, trajectory-balance loss, backward) of a small HyperGrid task,
    scored from the sampling pass or by a second forward pass: the FLOPs derived from the
    recorded rows are those torch counts for every matmul run."""
    spec = bench.EnvSpec.parse("2x4")
    batch = RECORD_PASS_MIN_BATCH  # large enough for the loss to use the sampling pass
    cfg = bench.kinetic_config(spec.overrides, batch, 1, "adamw", 0, ("model.hidden=16",))
    run = bench.KineticRun(cfg)
    # Through a wrapper (as DDP is), the loss evaluates the policy again.
    model = run.task.model if record else torch.nn.Sequential(run.task.model)
    with FlopCounterMode(display=False) as counted:
        loss, _ = run.task.loss(1, model)
        loss.backward()
    flops = run.rows.flops(run.rows.calls)
    assert flops["forward_rows"] > 0 and flops["backward_rows"] > 0
    taped_forwards = [call for call in run.rows.calls if call[1] and call[2]]
    assert (taped_forwards == []) == record
    assert flops["total"] == counted.get_total_flops()
    # The replay runs exactly those matmuls.
    replay = bench.MatmulReplay(run.rows.layers, max(r for r, *_ in run.rows.calls))
    with FlopCounterMode(display=False) as replayed:
        replay.run(run.rows.calls)
    assert replayed.get_total_flops() == flops["total"]
