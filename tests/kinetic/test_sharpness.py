"""The sharpness probe against known spectra: plain, preconditioned, and through attention."""

from __future__ import annotations

import math

import pytest
import torch

from kinetic.stability.sharpness import preconditioner, sharpness, stability_constant

SPECTRUM = torch.tensor([10.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)


def _quadratic(spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A = Q diag(spectrum) Q^T with a seeded random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(
        torch.randn(len(spectrum), len(spectrum), generator=g, dtype=torch.float64)
    )
    return q @ torch.diag(spectrum) @ q.T


def _split_params(n: int) -> list[torch.nn.Parameter]:
    """x in R^n held as two parameters (3 + n-3 coordinates), to exercise the list handling."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    return [torch.nn.Parameter(x[:3].clone()), torch.nn.Parameter(x[3:].clone())]


def _loss_fn(a: torch.Tensor, params: list[torch.nn.Parameter]):
    return lambda: 0.5 * (x := torch.cat(params)) @ a @ x


def test_top_eigenvalue_of_a_quadratic_within_1_percent():
    a = _quadratic(SPECTRUM)
    params = _split_params(len(SPECTRUM))
    top, pre = sharpness(_loss_fn(a, params), params, iters=20)
    assert pre is None
    assert top == pytest.approx(10.0, rel=0.01)


def test_negative_dominant_eigenvalue_still_gives_the_top_one():
    spectrum = torch.cat([torch.tensor([-20.0], dtype=torch.float64), SPECTRUM])
    a = _quadratic(spectrum, seed=2)
    params = _split_params(len(spectrum))
    top, _ = sharpness(_loss_fn(a, params), params, iters=60)
    assert top == pytest.approx(10.0, rel=0.01)


def test_preconditioned_top_eigenvalue_for_a_known_diagonal():
    a = _quadratic(SPECTRUM, seed=3)
    params = _split_params(len(SPECTRUM))
    opt = torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-3)
    v = torch.linspace(0.01, 4.0, len(SPECTRUM), dtype=torch.float64)  # v_hat after bias correction
    for p, vp in zip(params, (v[:3], v[3:]), strict=True):
        opt.state[p] = {
            "step": torch.tensor(2.0),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": vp * (1 - 0.99**2),  # so that v / (1 - beta2^t) = vp
        }
    pre = preconditioner(opt)
    p_diag = v.sqrt() + 1e-3
    d = torch.diag(p_diag.rsqrt())
    expected = float(torch.linalg.eigvalsh(d @ a @ d).max())
    _, top_pre = sharpness(_loss_fn(a, params), params, iters=40, precond=pre)
    assert top_pre == pytest.approx(expected, rel=0.01)
    assert pre.adaptive
    assert pre.constant == pytest.approx(38.0)  # (2 + 2 * 0.9) / (1 - 0.9)
    assert pre.eta0 == 1e-2


@pytest.mark.parametrize(
    ("make", "constant", "adaptive"),
    [
        (lambda ps: torch.optim.AdamW(ps, lr=0.1, betas=(0.5, 0.9)), 6.0, True),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 3.8, False),
        (lambda ps: torch.optim.SGD(ps, lr=0.1), 2.0, False),
    ],
)
def test_stability_constant_follows_the_optimizer_type(make, constant, adaptive):
    p = torch.nn.Parameter(torch.ones(3))
    opt = make([p])
    p.grad = torch.ones(3)
    opt.step()  # Adam-type state exists only after a step
    assert stability_constant(opt) == (pytest.approx(constant), adaptive)


def test_adaptive_heavy_ball_uses_its_current_momentum():
    """AdaHB's beta is set each step: on f = L x^2 / 2 (L = 4, lr 0.01) it is (1 - sqrt(0.04))^2
    = 0.64 from the second step, so heavy-ball SGD's threshold constant is 2 + 2 * 0.64."""
    from optim.adahb import AdaHBAdam, AdaHBSGD

    for make in (lambda ps: AdaHBSGD(ps, lr=0.01), lambda ps: AdaHBAdam(ps, lr=0.01)):
        x = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        opt = make([x])
        for _ in range(3):
            opt.zero_grad()
            (2.0 * x.square()).sum().backward()
            opt.step()
        beta = float(opt.last_momentum[0])
        constant, adaptive = stability_constant(opt)
        if isinstance(opt, AdaHBSGD):
            assert beta == pytest.approx(0.64)
            assert (constant, adaptive) == (pytest.approx(3.28), False)
        else:
            assert 0 < beta < 1
            assert (constant, adaptive) == (pytest.approx((2 + 2 * beta) / (1 - beta)), True)
            assert preconditioner(opt).adaptive


def test_group_rates_and_vradam_eta_t_enter_the_preconditioner():
    from optim.vradam import VRAdam

    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
    opt = VRAdam([{"params": [a]}, {"params": [b], "lr": 0.4}], lr=0.1, beta3=1.0, norm="group")
    a.grad, b.grad = torch.ones(2), torch.ones(1)
    opt.step()
    pre = preconditioner(opt)
    eta = opt.last_lr_tensor.tolist()
    assert pre.eta0 == pytest.approx(eta[0])
    # scale = (eta_g / eta_0) / (sqrt(v_hat) + eps), v_hat = g^2 = 1 after one step.
    assert float(pre.scale[b][0]) == pytest.approx(eta[1] / eta[0] / (1 + 1e-8))


def test_unused_parameters_and_linear_losses():
    used, unused, linear = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    loss_fn = lambda: 1.5 * (used**2).sum() + linear.sum()  # noqa: E731
    top, _ = sharpness(loss_fn, [used, unused, linear], iters=5)
    assert top == pytest.approx(3.0)
    assert sharpness(lambda: linear.sum(), [linear], iters=5)[0] == 0.0


def test_probe_through_diffusers_attention_blocks():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, layers_per_block=1,
    )  # fmt: skip
    x, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([1, 10, 100, 500])

    def loss_fn() -> torch.Tensor:
        return torch.nn.functional.mse_loss(unet(x, t).sample, noise)

    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    loss_fn().backward()
    opt.step()
    params = list(unet.parameters())
    top, top_pre = sharpness(loss_fn, params, iters=3, precond=preconditioner(opt))
    assert math.isfinite(top) and top > 0
    assert math.isfinite(top_pre) and top_pre > 0
