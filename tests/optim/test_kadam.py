"""k-Adam: k = 1 is torch's Adam(W); k > 1 against a hand-written recursion; stability check."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

from optim import KAdam


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    ).double()


def _train(net, opt, steps: int) -> None:
    for i in range(steps):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
        y = torch.randn(32, 3, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    ("make_torch", "wd"),
    [
        (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False), 0.1),
        (lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False), 0.0),
    ],
    ids=["adamw", "adam"],
)
def test_k1_is_adam(make_torch, wd):
    net, ref = _mlp(), _mlp()
    opt = KAdam(net.parameters(), lr=1e-2, weight_decay=wd, k=1)
    opt_ref = make_torch(ref.parameters())
    _train(net, opt, 50)
    _train(ref, opt_ref, 50)
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][key], opt_ref.state[b][key], rtol=1e-12, atol=0)
        assert "inner_exp_avg" not in opt.state[a]


def _hand_written(theta, curv, steps, k, lr, betas, eps, wd):
    """The recursion of the KAdam docstring on f = ½ Σ c_i θ_i², in Python floats."""
    b1, b2 = betas
    n = len(theta)
    m = [[0.0] * n for _ in range(k)]
    v = [[0.0] * n for _ in range(k)]
    for t in range(1, steps + 1):
        u = [c * x for c, x in zip(curv, theta, strict=True)]
        for j in range(k):
            m[j] = [b1 * a + (1 - b1) * b for a, b in zip(m[j], u, strict=True)]
            v[j] = [b2 * a + (1 - b2) * b * b for a, b in zip(v[j], u, strict=True)]
            u = [
                (a / (1 - b1**t)) / (math.sqrt(b / (1 - b2**t)) + eps)
                for a, b in zip(m[j], v[j], strict=True)
            ]
        theta = [x * (1 - lr * wd) - lr * ui for x, ui in zip(theta, u, strict=True)]
    return theta


@pytest.mark.parametrize("k", [2, 3])
def test_matches_hand_written_recursion(k):
    theta0, curv = [1.5, -0.7, 0.2, 3.0], [0.5, 2.0, 10.0, 1.0]
    hyper = dict(lr=0.05, betas=(0.8, 0.99), eps=1e-8, wd=0.01)
    expected = _hand_written(theta0, curv, 40, k, **hyper)
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    c = torch.tensor(curv, dtype=torch.float64)
    opt = KAdam([p], lr=0.05, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.01, k=k)
    for _ in range(40):
        opt.zero_grad()
        (0.5 * (c * p**2).sum()).backward()
        opt.step()
    torch.testing.assert_close(
        p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14
    )
    state = opt.state[p]
    assert state["inner_exp_avg"].shape == (k - 1, 4)
    # Level 1 is Adam's own moment of the raw gradient.
    assert torch.equal(state["exp_avg_sq"] > 0, torch.ones(4, dtype=torch.bool))


def test_levels_differ_from_adam():
    net1, net2 = _mlp(), _mlp()
    _train(net1, KAdam(net1.parameters(), lr=1e-2, k=1), 5)
    _train(net2, KAdam(net2.parameters(), lr=1e-2, k=2), 5)
    assert not torch.allclose(net1[0].weight, net2[0].weight)


def test_warns_outside_the_stability_condition():
    message = (
        "k-Adam with betas=(0.99, 0.9) is outside its stability condition beta1^2 < beta2 "
        f"({0.99**2!r} >= 0.9); its steps may grow without bound"
    )
    with pytest.warns(UserWarning, match=f"^{re.escape(message)}$"):
        KAdam([torch.nn.Parameter(torch.ones(2))], betas=(0.99, 0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KAdam([torch.nn.Parameter(torch.ones(2))], betas=(0.9, 0.999))


def test_unknown_group_keys_are_ignored():
    net = _mlp()
    opt = KAdam([{"params": net.parameters(), "beta3": 0.1, "lr": 3e-3}], k=2)
    _train(net, opt, 2)
    assert opt.param_groups[0]["lr"] == 3e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "Invalid k: 0; expected an int >= 1"),
        ({"k": 1.5}, "Invalid k: 1.5; expected an int >= 1"),
        ({"k": True}, "Invalid k: True; expected an int >= 1"),
        ({"lr": math.nan}, "Invalid lr: nan; expected a float > 0"),
        ({"betas": (1.0, 0.999)}, "Invalid betas[0]: 1; expected a float in [0, 1)"),
        ({"eps": 0.0}, "Invalid eps: 0; expected a float > 0"),
        ({"weight_decay": -1.0}, "Invalid weight_decay: -1; expected a float >= 0"),
    ],
)
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        KAdam([torch.nn.Parameter(torch.ones(2))], **kwargs)
