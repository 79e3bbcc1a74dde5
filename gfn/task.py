"""The GFlowNet task for the training loop: sample a batch, score its loss, evaluate exactly."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from envs.base import Env
from envs.checker import check_env
from envs.continuous import ContinuousEnv
from gfn.config import MODELS
from gfn.continuous import (
    EVAL_CHUNK,
    heatmap,
    histogram_metrics,
    sample_continuous,
)
from gfn.estimators import terminal_log_probs
from gfn.evaluation import (
    count_modes,
    exact_metrics,
    exact_terminal_distribution,
    grid_pair_image,
    state_dag,
    terminal_index,
    true_terminal_distribution,
)
from gfn.local_search import LocalSearch, refine
from gfn.losses import GFlowNetLoss, get_loss, loss_from_config
from gfn.policies import GFlowNet, MLPPolicy, masked_log_softmax, policy_input
from gfn.replay import ReplayBuffer
from gfn.sampler import ROLLOUTS, Trajectories, compile_static_steps, sample_trajectories
from gfn.state_dag import has_modes, implements, is_enumerable
from kinetic import distributed
from kinetic.checkpoint import CheckpointError, check_state_shapes
from kinetic.device import resolve_device
from kinetic.errors import ConfigError, call_with_config
from kinetic.task import Task
from kinetic.validate import check_choice, check_int, check_probability

# The smallest batch whose loss is scored from its recorded sampling pass. Measured on one CPU
# thread (8^2 and 8^4 HyperGrids, 256x2 MLP, sample + TB loss + backward, interleaved): the
# recorded pass costs about four operators per sampling step and a few joins at its end, and
# saves the second forward pass; it was 3-9% slower at batch 16 and 64 and 8-12% faster at 256.
RECORD_PASS_MIN_BATCH = 128


def build_env(cfg: DictConfig) -> Env:
    """The environment named by `cfg.env._target_` (an import path), built with its keys. Its
    constructor's refusal (a ValueError or TypeError) reaches the user in its own words as a
    `ConfigError`, not wrapped in Hydra's InstantiationException."""
    kwargs = OmegaConf.to_container(cfg.env, resolve=True)
    target = kwargs.pop("_target_", None)
    if not isinstance(target, str):
        raise ConfigError(
            "env needs _target_: the import path of an Env class, e.g. envs.hypergrid.HyperGrid"
        )
    try:
        factory = hydra.utils.get_object(target)
    except Exception as err:  # ImportError, AttributeError, ValueError: all say "not found"
        raise ConfigError(f"env._target_={target} cannot be imported: {err}") from err
    env = call_with_config(factory, kwargs, f"env={target.rsplit('.', 1)[-1]}")
    if not isinstance(env, (Env, ContinuousEnv)):
        raise ConfigError(
            f"env._target_={target} built a {type(env).__name__}, not an Env or a ContinuousEnv"
        )
    return env


def build_policy(cfg: DictConfig, env: Env, flow_head: bool = False) -> torch.nn.Module:
    """The policy network of `cfg.model` for `env` (input width read from `featurize`), with
    a flow head log F(s) when the loss needs one."""
    if cfg.model.name == "mlp" and isinstance(env, ContinuousEnv):
        # Heads: the forward and backward distributions' raw parameters (none backward for a
        # fixed P_B), and log F.
        n_features = env.featurize(env.initial_states(1)).shape[-1]
        return MLPPolicy(
            n_features, env.n_forward_params, hidden=cfg.model.hidden,
            n_layers=cfg.model.n_layers, backward=cfg.model.backward, flow_head=flow_head,
            activation=cfg.model.activation, n_backward_outputs=env.n_backward_params,
        )  # fmt: skip
    if cfg.model.name == "mlp":
        features = env.featurize(env.initial_states(1))
        if not isinstance(features, Tensor):
            raise ConfigError(
                f"model=mlp needs featurize() to return a tensor, but {type(env).__name__} "
                f"returns a {type(features).__name__}; "
                "use model=gnn for graph environments"
            )
        return MLPPolicy(
            features.shape[-1] + env.condition_dim,
            env.n_actions,
            hidden=cfg.model.hidden,
            n_layers=cfg.model.n_layers,
            backward=cfg.model.backward,
            flow_head=flow_head,
            activation=cfg.model.activation,
        )
    if cfg.model.name == "gnn":
        if isinstance(env, ContinuousEnv):
            raise ConfigError(f"model=gnn needs graph states; {type(env).__name__} is continuous")
        if env.condition_dim:
            raise ConfigError(
                f"model=gnn takes no condition; {type(env).__name__} is conditional: use model=mlp"
            )
        from gfn.gnn import build_gnn_policy  # torch-geometric is imported only when needed

        return build_gnn_policy(cfg.model, env, flow_head=flow_head)
    raise ConfigError(f"Unknown model.name: {cfg.model.name!r}; valid: {', '.join(MODELS)}")


def check_loss_fits(env: Env | ContinuousEnv, loss: GFlowNetLoss) -> None:
    """A loss scored from edge flows or exit probabilities (fm, mdb) needs discrete actions
    and reads no condition: refused by name on a continuous or a conditional environment."""
    if loss.scores_log_probs:
        return
    if isinstance(env, ContinuousEnv):
        kind = "continuous"
    elif env.condition_dim:
        kind = "conditional"
    else:
        return
    raise ConfigError(
        f"loss={loss.name} is not available on the {kind} environment "
        f"{type(env).__name__}; valid: tb, db, subtb, zvar"
    )


class GFlowNetTask(Task):
    """A GFlowNet on one environment: on-policy batches (optionally mixed with replay), one
    loss, and exact evaluation where the environment can be enumerated.

    Args:
        env: the environment (envs/; `check_env(env)` tells what is wrong with a new one).
        model: the `GFlowNet` (policy and log Z); a loss that needs log F(s) (db, subtb) needs a
            policy with a flow head (`MLPPolicy(..., flow_head=True)`).
        loss: the loss (a `gfn.losses.GFlowNetLoss`), or its name (gfn/losses.py: tb, db,
            subtb, zvar, fm, mdb).
        loss_options: the named loss's own arguments, e.g. ``{"lamda": 0.9}`` for subtb.
        batch_size: trajectories per step, over all ranks of a distributed run (each rank
            samples batch_size / world_size of them).
        log_z_lr: log Z's own learning rate (None: the optimizer's).
        log_z_beta3: VRAdam's velocity penalty for log Z's group (None: the optimizer's;
            other optimizers ignore it).
        epsilon: probability of a uniform exploratory action (never changes the loss's
            log-probs).
        temperature: softmax temperature of the sampling policy.
        eval_samples: policy samples per evaluation, for environments without exact metrics.
        replay: a `ReplayBuffer` on `env` (None: on-policy only); one per rank.
        replay_fraction: share of each batch drawn from `replay`, in (0, 1).
        seed: seeds the training stream (`generator`; rank r of a distributed run draws from
            `distributed.rank_seed(seed, r)`) and, with seed + 1, the evaluation's.
        local_search: LS-GFN (`gfn.local_search.LocalSearch`): each on-policy batch is refined
            `refinements` times (backtrack K steps with P_B, rebuild with P_F, accept by MH or
            greedily) and the step trains on the batch and its refined trajectories; every
            proposal counts as a sampled trajectory (`items_per_step`) and marks the terminal
            states it reached as visited. None or 0 refinements: off.
        rollout: ``"dynamic"`` (steps only running trajectories, once per distinct state
            while many share one; the fastest eager sampler) or ``"static"`` (lockstep in
            fixed shapes: compiles whole, and runs under CUDA graphs); the same trajectories
            either way (`gfn.sampler.sample_trajectories`).
        rollout_chunk: the static rollout's lockstep steps per call (per compiled graph).
        compile_rollout: run the static rollout's chunks through
            ``torch.compile(fullgraph=True)`` (``mode="reduce-overhead"`` on CUDA).
    """

    per_rank_state = ("visited", "found_targets", "replay")  # the weights are shared
    items_name = "trajectories"
    progress_keys = ("l1",)
    summary_keys = (
        "l1", "tv", "jsd", "log_z_error", "modes_found", "spearman_test", "loss",
        "trajectories_per_sec",
    )  # fmt: skip
    objective_key = "l1"

    def __init__(
        self,
        env: Env,
        model: GFlowNet,
        loss: GFlowNetLoss | str = "tb",
        *,
        loss_options: Mapping[str, Any] | None = None,
        batch_size: int = 16,
        log_z_lr: float | None = 0.1,
        log_z_beta3: float | None = None,
        epsilon: float = 0.0,
        temperature: float = 1.0,
        eval_samples: int = 256,
        replay: ReplayBuffer | None = None,
        replay_fraction: float = 0.0,
        seed: int = 0,
        local_search: LocalSearch | None = None,
        rollout: str = "dynamic",
        rollout_chunk: int = 8,
        compile_rollout: bool = False,
    ) -> None:
        self.env = env
        self.model = model
        if isinstance(loss, str):
            loss = get_loss(loss, **dict(loss_options or {}))
        self.loss_fn = loss
        check_loss_fits(env, loss)
        self.conditional = env.condition_dim > 0
        self.summary_keys = self._summary_keys()
        self.batch_size = batch_size  # global: split over the ranks of a distributed run
        self.local_batch_size = distributed.per_rank(batch_size, "task.batch_size")
        self.epsilon, self.temperature = epsilon, temperature
        self.rollout = check_choice("task.rollout", rollout, ROLLOUTS)
        self.rollout_chunk = check_int("task.rollout_chunk", rollout_chunk, 1)
        if compile_rollout and rollout != "static":
            raise ConfigError(
                "compile_rollout compiles the static rollout's lockstep steps; set "
                f"rollout='static' (got rollout={rollout!r}) or compile_rollout=False"
            )
        # The static rollout's chunk of steps, compiled whole (None: eager `static_steps`).
        self.steps_fn = compile_static_steps(env.s0.device) if compile_rollout else None
        self.log_z_lr = log_z_lr
        self.log_z_beta3 = log_z_beta3
        device = self.env.s0.device
        self.seed = seed
        self.generator = torch.Generator(device=device).manual_seed(distributed.rank_seed(seed))
        # Evaluation draws from its own stream, so evaluating never changes the training run.
        self.eval_generator = torch.Generator(device=device).manual_seed(seed + 1)
        self.eval_samples = eval_samples

        self.replay = None
        self.n_replay = 0
        if replay is not None and replay_fraction > 0:
            check_probability("task.replay.fraction", replay_fraction, high_open=True)
            self.replay = replay
            self.n_replay = round(self.local_batch_size * replay_fraction)
        self.local_search = None
        if local_search is not None and local_search.refinements > 0:
            self.local_search = local_search.check(env)
        # Trajectories drawn per step: the batch, and each refinement round's proposals.
        n_rounds = 0 if self.local_search is None else self.local_search.refinements
        self.items_per_step = self.batch_size * (1 + n_rounds)
        # Where evaluation writes the env's data files (`Env.data_files`) on its first call;
        # None: nowhere. Set by `from_config` to the run directory.
        self.run_dir: Path | None = None
        self._data_written = False

        self.found_targets: Tensor | None = None  # for envs with mode_hits, (n_targets,) bool
        self.enumerable = is_enumerable(self.env)
        if self.enumerable:
            n_terminals = state_dag(self.env).terminals.shape[0]
            self.visited = torch.zeros(n_terminals, dtype=torch.bool, device=self.env.s0.device)

    def _summary_keys(self) -> tuple[str, ...]:
        """The `done:` line's keys for this environment: the class's, with the worst and each
        held-out condition's L1 and log Z error for a conditional one, and the environment's
        own (`Env.summary_keys`, e.g. the edge-marginal error of structure learning)."""
        keys = list(type(self).summary_keys)
        if self.conditional:
            labels = [self.env.condition_label(c) for c in self.env.eval_conditions()]
            at = keys.index("l1") + 1
            keys[at:at] = ["l1_max", *(f"l1@{label}" for label in labels)]
            at = keys.index("log_z_error") + 1
            keys[at:at] = [f"log_z_error@{label}" for label in labels]
        at = keys.index("jsd") + 1
        keys[at:at] = getattr(self.env, "summary_keys", ())
        return tuple(keys)

    @classmethod
    def from_config(cls, cfg: DictConfig, run_dir: str | Path | None = None) -> GFlowNetTask:
        """The task of a composed config: `env`, `model`, `loss`, `task` (gfn) and `seed`; the
        environment, the model and the replay buffer on `device`, the policy compiled with
        `compile` (dynamic shapes: the sampler calls it on a different batch at every step)."""
        tc = cfg.task
        device = resolve_device(cfg.get("device", "auto"))
        env = build_env(cfg).to(device)
        if isinstance(env, ContinuousEnv):
            cls = ContinuousGFlowNetTask
        if tc.check_env:  # a few random rollouts: tells an env author what is wrong, in words
            check_env(env, seed=cfg.seed)
        loss = loss_from_config(cfg.loss)
        policy = build_policy(cfg, env, flow_head=loss.flow_head)
        model = GFlowNet(policy, log_z_init=tc.log_z_init, condition_dim=env.condition_dim).to(
            device
        )
        # compile: the static rollout's chunk of steps when the rollout is static (fixed
        # shapes, one graph), else the policy (dynamic shapes: a different batch every step).
        compile_rollout = bool(cfg.get("compile", False)) and tc.rollout == "static"
        if cfg.get("compile", False) and not compile_rollout:
            model.policy.compile(dynamic=True)  # in place: the state dict keeps its keys
        replay = None
        if tc.replay.capacity > 0 and tc.replay.fraction > 0:
            # One buffer per rank, of the rank's share of the capacity (see docs/distributed.md).
            capacity = math.ceil(tc.replay.capacity / distributed.world_size())
            replay = ReplayBuffer(env, capacity, tc.replay.priority)
        task = cls(
            env, model, loss, batch_size=tc.batch_size, log_z_lr=tc.log_z_lr,
            log_z_beta3=tc.get("log_z_beta3"),
            epsilon=tc.epsilon, temperature=tc.temperature, eval_samples=tc.eval_samples,
            replay=replay, replay_fraction=tc.replay.fraction, seed=cfg.seed,
            local_search=LocalSearch(**tc.local_search), rollout=tc.rollout,
            rollout_chunk=tc.rollout_chunk, compile_rollout=compile_rollout,
        )  # fmt: skip
        task.run_dir = None if run_dir is None else Path(run_dir)
        return task

    def param_groups(self) -> list[dict[str, Any]]:
        """The policy, then log Z with its own learning rate (and VRAdam's beta3, if set)."""
        groups = self.model.parameter_groups(log_z_lr=self.log_z_lr)
        if self.log_z_beta3 is not None:
            groups[-1]["beta3"] = self.log_z_beta3  # other optimizers ignore the key
        return groups

    def loss(
        self, step: int, model: torch.nn.Module | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one batch, scored through `model` (default: `train_module()`, the
        `GFlowNet`; under torchrun the loop passes its DistributedDataParallel wrapper)."""
        model = self.train_module() if model is None else model
        # Off-policy share of the batch: as many replayed trajectories as the buffer can give.
        n_old = 0 if self.replay is None else min(self.n_replay, len(self.replay))
        # A batch that is exactly what the sampler drew, scored through the task's own model,
        # is scored from the sampling pass (no second forward pass of the policy) when it is
        # large enough for that to pay.
        record_pass = (
            self.loss_fn.scores_log_probs  # (what a recorded pass can serve)
            and n_old == 0
            and self.local_batch_size >= RECORD_PASS_MIN_BATCH
            and self.local_search is None
            and model is self.model
            and distributed.world_size() == 1
        )
        batch = self.sample(
            self.local_batch_size - n_old, self.generator, explore=True, record_pass=record_pass
        )
        drawn = [batch]
        acceptance = None
        if self.local_search is not None:
            refined, proposals, acceptance = refine(
                self.model, self.env, batch, self.generator, self.local_search
            )
            drawn += proposals
            batch = Trajectories.concatenate([batch, refined])
        for trajectories in drawn:
            self._mark_drawn(trajectories.terminal_states)
        if self.replay is not None:
            old = self.replay.sample(n_old, self.generator) if n_old else None
            self.replay.add(batch)
            if old is not None:
                batch = Trajectories.concatenate([batch, old])
        # The one gradient-carrying forward pass goes through `model` (DDP in a distributed
        # run); log Z enters the loss outside it, and DDP averages its gradient too.
        log_z = self.model.log_z_of(batch.conditions)  # scalar, or (B,) log Z(c)
        loss = self.loss_fn(self.loss_fn.score(model, self.env, batch), batch, log_z)
        scalars = self.loss_fn.scalars(self.model)
        if acceptance is not None:
            scalars["train/ls_acceptance"] = acceptance
        if self.conditional and "train/log_z" in scalars:
            scalars["train/log_z"] = log_z.detach().mean()  # the batch's mean log Z(c)
        return loss, scalars

    def sample(
        self, n: int, generator: torch.Generator, explore: bool = False, record_pass: bool = False
    ) -> Trajectories:
        """`n` trajectories of the current policy (with the task's exploration if `explore`),
        without autograd: the one sampler the loss, the probe and the evaluation call. With
        `record_pass` the batch keeps the policy's pass for the loss to score from
        (`gfn.sampler.SamplingPass`)."""
        epsilon, temperature = (self.epsilon, self.temperature) if explore else (0.0, 1.0)
        return sample_trajectories(
            self.model, self.env, n, generator, epsilon, temperature,
            rollout=self.rollout, steps_fn=self.steps_fn, chunk=self.rollout_chunk,
            record_pass=record_pass,
        )  # fmt: skip

    def _mark_drawn(self, terminal_states: Tensor) -> None:
        """Record terminal states the run has drawn (visited states, targets hit), without a
        host sync."""
        if self.enumerable:
            self.visited[terminal_index(self.env, terminal_states)] = True
        if implements(self.env, "mode_hits"):
            hits = self.env.mode_hits(terminal_states).any(dim=0)  # (n_targets,)
            self.found_targets = hits if self.found_targets is None else self.found_targets | hits

    def probe_loss(self, step: int) -> Tensor:
        """The loss of a fresh on-policy batch for the sharpness probe, with no side effects: its
        own generator (seeded by the step), and the visited states, found targets and replay
        buffer left as they were, so a probed run trains exactly as an unprobed one."""
        generator = torch.Generator(device=self.env.s0.device).manual_seed(self.seed + 7919 * step)
        batch = self.sample(self.local_batch_size, generator, explore=True)
        scores = self.loss_fn.score(self.model, self.env, batch)
        return self.loss_fn(scores, batch, self.model.log_z_of(batch.conditions))

    def gather_from_ranks(self) -> None:
        """The terminal states and targets any rank has drawn (two all-reduces)."""
        if self.enumerable:
            self.visited = distributed.any_over_ranks(self.visited)
        if self.found_targets is not None:
            self.found_targets = distributed.any_over_ranks(self.found_targets)

    @torch.no_grad()
    def _log_pf(self, states: Tensor, condition: Tensor | None = None) -> Tensor:
        """Masked log P_F of `states`, under one `condition` ``(C,)`` if conditional."""
        conditions = None if condition is None else condition.expand(states.shape[0], -1)
        logits = self.model(policy_input(self.env.featurize(states), conditions)).pf_logits
        return masked_log_softmax(logits, self.env.forward_mask(states))

    def _conditional_target(self, condition: Tensor) -> tuple[Tensor, float]:
        """p*(x | c) over the terminals, float64, and log Z*(c), at one condition ``(C,)``."""
        terminals = state_dag(self.env).terminals
        conditions = condition.expand(terminals.shape[0], -1)
        log_r = self.env.conditional_log_reward(terminals, conditions).double()
        log_z_star = torch.logsumexp(log_r, dim=0)
        return (log_r - log_z_star).exp(), float(log_z_star)

    def log_z(self) -> Tensor | None:
        """The model's estimate of log Z under its loss (`GFlowNetLoss.estimate_log_z`): the
        learned scalar for TB, log F(s0) for flow losses, the one fm's and mdb's flows imply,
        none for the log-partition variance loss."""
        return self.loss_fn.estimate_log_z(self.model, self.env)

    def evaluate(self, step: int) -> dict[str, float]:
        self._save_data_files()
        if self.conditional:
            return self._conditional_metrics()
        log_z = self.log_z()
        metrics = {} if log_z is None else {"log_z": float(log_z)}
        if self.found_targets is not None:
            metrics["modes_found"] = float(self.found_targets.sum())
        if implements(self.env, "sampled_metrics"):
            samples = self.sample(self.eval_samples, self.eval_generator).terminal_states
            metrics |= self.env.sampled_metrics(samples, self._log_p_terminal)
            self._save("samples", samples)
        if self.enumerable:
            visited = state_dag(self.env).terminals[self.visited] if has_modes(self.env) else None
            metrics |= exact_metrics(self.env, self._log_pf, log_z, visited)
        return metrics

    def _save(self, name: str, array: Tensor) -> None:
        """`array` as ``<name>.npy`` in the run directory (rank 0 only; nowhere without one):
        what an evaluation scored, so its figures can be recomputed outside kinetic."""
        if self.run_dir is not None and distributed.is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            np.save(self.run_dir / f"{name}.npy", array.detach().cpu().numpy())

    def _save_data_files(self) -> None:
        """The environment's `data_files` (what its reward reads), once per run."""
        if not self._data_written:
            for name, array in self.env.data_files().items():
                self._save(name, array)
            self._data_written = True

    @torch.no_grad()
    def _conditional_metrics(self) -> dict[str, float]:
        """Exact metrics at each of the environment's held-out conditions c: ``l1@<c>``,
        ``jsd@<c>`` and ``log_z_error@<c>`` (log Z(c): the learned one for tb, log F(s0 | c)
        for flow losses), and their means over the conditions as ``l1``, ``tv``, ``jsd`` and
        ``log_z_error`` (``l1_max``: the worst condition's)."""
        env = self.env
        per_condition: dict[str, list[float]] = {"l1": [], "jsd": [], "log_z_error": []}
        metrics: dict[str, float] = {}
        for condition in env.eval_conditions():
            label = env.condition_label(condition)
            exact = exact_metrics(
                env, partial(self._log_pf, condition=condition),
                self.loss_fn.estimate_log_z(self.model, env, condition),
                target=self._conditional_target(condition),
            )  # fmt: skip
            for key, values in per_condition.items():
                if key in exact:
                    metrics[f"{key}@{label}"] = exact[key]
                    values.append(exact[key])
        for key, values in per_condition.items():
            if values:
                metrics[key] = sum(values) / len(values)
        metrics["tv"] = metrics["l1"] / 2
        metrics["l1_max"] = max(per_condition["l1"])
        if self.found_targets is not None:
            metrics["modes_found"] = float(self.found_targets.sum())
        if has_modes(env):  # drawn under any condition
            found = count_modes(env, state_dag(env).terminals[self.visited])
            metrics["modes_found"], metrics["mode_regions_found"] = map(float, found)
        return metrics

    def _log_p_terminal(self, x: Tensor) -> Tensor:
        """log P_T(x) of terminal states, estimated through P_B (exact on tree-shaped DAGs)."""
        return terminal_log_probs(self.model, self.env, x, generator=self.eval_generator)

    def images(self, step: int) -> dict[str, np.ndarray]:
        """For 2-D grids: the learned terminal distribution beside the target one (one row
        per held-out condition for a conditional environment)."""
        if not (self.enumerable and self.env.state_shape == (2,)):
            return {}
        if self.conditional:
            rows = []
            for condition in self.env.eval_conditions():
                log_pf = partial(self._log_pf, condition=condition)
                terminals, p = exact_terminal_distribution(self.env, log_pf)
                rows.append(side_by_side(terminals, p, self._conditional_target(condition)[0]))
            return {"distribution": np.concatenate(rows, axis=0)}
        terminals, p = exact_terminal_distribution(self.env, self._log_pf)
        p_star, _ = true_terminal_distribution(self.env)
        return {"distribution": side_by_side(terminals, p, p_star)}

    def state_dict(self) -> dict[str, Any]:
        """Everything the task carries from step to step: the GFlowNet's weights, the terminal
        states visited and targets found so far (for modes_found), and the replay buffer."""
        return {
            "model": self.model.state_dict(),
            "visited": self.visited.clone() if self.enumerable else None,
            "found_targets": None if self.found_targets is None else self.found_targets.clone(),
            "replay": None if self.replay is None else self.replay.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; a model of another shape or a replay buffer switched on or
        off is refused by name."""
        check_state_shapes(state["model"], self.model.state_dict(), "GFlowNet")
        saved = None if state["replay"] is None else state["replay"]["capacity"]
        capacity = None if self.replay is None else self.replay.capacity
        if saved != capacity:
            raise CheckpointError(
                f"The checkpoint's replay buffer holds {saved or 'no'} trajectories, this run's "
                f"{capacity or 'none'} (task.replay.capacity); resume with the run's own"
            )
        self.model.load_state_dict(state["model"])
        if self.enumerable:
            self.visited.copy_(state["visited"])
        found = state["found_targets"]
        self.found_targets = None if found is None else found.to(self.env.s0.device)
        if self.replay is not None:
            self.replay.load_state_dict(state["replay"])

    def generators(self) -> dict[str, torch.Generator]:
        """The training stream (batches, replay draws) and the evaluation's, which carries
        across evaluations."""
        return {"batches": self.generator, "eval": self.eval_generator}


class ContinuousGFlowNetTask(GFlowNetTask):
    """The GFlowNet task on a continuous environment: on-policy batches from
    `gfn.continuous.sample_continuous`, tb/db/subtb/zvar on log-densities (`GFlowNetLoss.score`
    scores them), histogram evaluation of `eval_samples` terminal samples (written to the run
    directory as samples.npy), and a heatmap of the learned density beside the target's."""

    summary_keys = (
        "jsd", "jsd_floor", "l1", "l1_floor", "jsd_kde", "log_z_error", "loss",
        "trajectories_per_sec",
    )  # fmt: skip
    progress_keys = ("jsd",)
    objective_key = "jsd"

    def __init__(self, env: ContinuousEnv, model: GFlowNet, loss: GFlowNetLoss, **kwargs: Any):
        search = kwargs.get("local_search")
        unavailable = {
            "replay": kwargs.get("replay") is not None and kwargs.get("replay_fraction", 0) > 0,
            "local_search": search is not None and search.refinements > 0,
        }
        for key, asked in unavailable.items():
            if asked:
                raise ConfigError(
                    f"task.{key} is not available on the continuous environment "
                    f"{type(env).__name__}: it works on discrete actions"
                )
        if kwargs.get("epsilon", 0.0) or kwargs.get("temperature", 1.0) != 1.0:
            raise ConfigError(
                "task.epsilon and task.temperature apply to discrete actions; a continuous "
                f"environment ({type(env).__name__}) takes task.epsilon=0 and task.temperature=1"
            )
        if kwargs.get("rollout", "dynamic") != "dynamic" or kwargs.get("compile_rollout"):
            raise ConfigError(
                "task.rollout=static applies to discrete actions; a continuous environment "
                f"({type(env).__name__}) takes task.rollout=dynamic (and compile=true compiles "
                "its policy)"
            )
        super().__init__(env, model, loss, **kwargs)
        self.last_samples: Tensor | None = None

    def sample(
        self, n: int, generator: torch.Generator, explore: bool = False, record_pass: bool = False
    ) -> Trajectories:
        """`n` trajectories of the current policy (no exploration: the constructor refused it),
        in chunks of `EVAL_CHUNK` (an evaluation draws hundreds of thousands); no recorded
        pass (`record_pass` is ignored: the density scorer evaluates the policy itself)."""
        chunks = [
            sample_continuous(self.model, self.env, min(EVAL_CHUNK, n - start), generator)
            for start in range(0, n, EVAL_CHUNK)
        ]
        return chunks[0] if len(chunks) == 1 else Trajectories.concatenate(chunks)

    def evaluate(self, step: int) -> dict[str, float]:
        self._save_data_files()
        samples = self.sample(self.eval_samples, self.eval_generator).terminal_states
        self.last_samples = samples
        metrics = histogram_metrics(self.env, samples, self.eval_generator)
        log_z = self.log_z()
        if log_z is not None:
            metrics["log_z"] = float(log_z)
            if self.env.true_log_z is not None:
                metrics["log_z_error"] = abs(float(log_z) - self.env.true_log_z)
        self._save("samples", samples)
        return metrics

    def images(self, step: int) -> dict[str, np.ndarray]:
        if self.last_samples is None:
            return {}
        image = heatmap(self.env, self.last_samples)
        return {} if image is None else {"density": image}


def side_by_side(terminals: Tensor, p: Tensor, p_star: Tensor, scale: int = 16) -> np.ndarray:
    """An RGB image (H, W, 3) in [0, 1]: p (left) and p* (right) on one colour scale."""
    coords = terminals.long().cpu()  # (N, 2)
    rows, cols = int(coords[:, 0].max()) + 1, int(coords[:, 1].max()) + 1
    grids = []
    for dist in (p, p_star):
        grid = torch.zeros(rows, cols, dtype=torch.float64)
        grid[coords[:, 0], coords[:, 1]] = dist.cpu().double()
        grids.append(grid.numpy())
    return grid_pair_image(*grids, scale)
