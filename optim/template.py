"""The shape every optimizer here shares, after torch.optim's ``adam.py``.

``__init__`` validates each hyperparameter (:mod:`optim.validation`); ``step()`` evaluates the
closure, lets ``_init_group`` gather each param group's tensors (creating state on first use),
and hands them to one functional entry point whose signature is the same for every
implementation of the rule. Nothing inside ``step()`` builds a tensor from host data or reads a
device value back: hyperparameters reach the kernels as Python scalars.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["evaluate_closure", "gradients", "step_groups"]


def evaluate_closure(closure: Callable[[], float] | None) -> float | None:
    """The loss of `closure` under grad mode (``step()`` itself runs under ``no_grad``)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def step_groups(
    optimizer: torch.optim.Optimizer,
    closure: Callable[[], float] | None,
    step_group: Callable[[dict], None],
) -> float | None:
    """The body of a ``step()``: the closure's loss, then ``step_group(group)`` for each param
    group (gathering its tensors and calling the functional); returns the loss."""
    loss = evaluate_closure(closure)
    for group in optimizer.param_groups:
        step_group(group)
    return loss


def gradients(optimizer: torch.optim.Optimizer, group: dict) -> list[tuple[Tensor, dict]]:
    """(parameter, its state) for every parameter of `group` that has a dense gradient."""
    out = []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients")
        out.append((p, optimizer.state[p]))
    return out


def gather(
    optimizer: torch.optim.Optimizer,
    group: dict,
    init: Callable[[dict, Tensor], None],
    **state_keys: str,
) -> dict[str, list]:
    """The lists a functional takes, for the parameters of `group` that have a gradient.

    ``init(state, p)`` fills an empty state on a parameter's first step. Returns ``params``,
    ``grads``, ``states`` (the state dicts) and one list per keyword, e.g.
    ``gather(opt, group, init_adam_state, exp_avgs="exp_avg")`` adds ``exp_avgs``.
    """
    lists: dict[str, list] = {"params": [], "grads": [], "states": []}
    lists |= {name: [] for name in state_keys}
    for p, state in gradients(optimizer, group):
        if len(state) == 0:
            init(state, p)
        lists["params"].append(p)
        lists["grads"].append(p.grad)
        lists["states"].append(state)
        for name, key in state_keys.items():
            lists[name].append(state[key])
    return lists


def hyperparameters(group: dict, names: tuple[str, ...]) -> dict:
    """The functional's keyword arguments from a param group: `names`, with ``betas`` spread
    into ``beta1`` and ``beta2``."""
    out = {name: group[name] for name in names if name != "betas"}
    if "betas" in names:
        out["beta1"], out["beta2"] = group["betas"]
    return out
