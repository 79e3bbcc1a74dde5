"""docs/extending.md, "Adding an optimizer": its code, run as written, against a hand-written
Lion and the no-host-data criterion; its YAML built through the registry by import path."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from optim import build_optimizer

DOC = (Path(__file__).resolve().parents[2] / "docs" / "extending.md").read_text()
SECTION = DOC[DOC.index("\n# Adding an optimizer\n") :]


def _block(language: str) -> str:
    match = re.search(rf"^```{language}\n(.*?)^```$", SECTION, flags=re.DOTALL | re.MULTILINE)
    assert match is not None, f"'Adding an optimizer' has no {language} block"
    return match.group(1)


@pytest.fixture
def my_optims(tmp_path, monkeypatch):
    (tmp_path / "my_optims.py").write_text(_block("python"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("my_optims")
    sys.modules.pop("my_optims", None)


def _hand_written_lion(theta, grads, lr, betas, wd):
    b1, b2 = betas
    m = [0.0] * len(theta)
    for g in grads:
        c = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        sign = [(ci > 0) - (ci < 0) for ci in c]
        theta = [x * (1 - lr * wd) - lr * s for x, s in zip(theta, sign, strict=True)]
        m = [b2 * mi + (1 - b2) * gi for mi, gi in zip(m, g, strict=True)]
    return theta


def test_the_documented_lion_is_lion(my_optims):
    theta0 = [1.0, -0.5, 0.25, 2.0]
    grads = [[0.3, -0.2, 0.0, 1.0], [-0.4, -0.1, 0.2, 0.5], [0.1, 0.3, -0.2, -0.2]]
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    opt = my_optims.Lion([p], lr=0.1, betas=(0.8, 0.9), weight_decay=0.5)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    expected = _hand_written_lion(theta0, grads, 0.1, (0.8, 0.9), 0.5)
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64))


def test_the_documented_yaml_builds_it(my_optims):
    cfg = OmegaConf.create(_block("yaml"))
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.ones(2))])
    assert isinstance(opt, my_optims.Lion)
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (1e-4, 0.1)
    with pytest.raises(ValueError, match=r"^Invalid lr: -1; expected a float > 0$"):
        my_optims.Lion([torch.nn.Parameter(torch.ones(2))], lr=-1.0)


def test_the_documented_lion_builds_no_host_data(my_optims, record_ops):
    p = torch.nn.Parameter(torch.ones(3))
    opt = my_optims.Lion([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + t))
    for _ in range(2):
        p.grad = torch.randn(3)
        opt.step()
        sched.step()
    with record_ops() as rec, torch.device("meta"):
        opt.step()
    assert "aten.lift_fresh.default" not in rec.ops
    assert "aten._local_scalar_dense.default" not in rec.ops
    assert rec.devices == {"cpu"}


def test_an_unimportable_path_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^Unknown optimizer: 'nowhere\.Lion'; not registered"):
        build_optimizer({"name": "nowhere.Lion"}, [torch.nn.Parameter(torch.ones(2))])
