"""torchgfn's side of `benchmarks/gfn_throughput.py`: a TB loop driven over a pipe.

Never imported by kinetic: it imports torchgfn, whose import name `gfn` is also kinetic's.
It runs in its own virtual environment, started by `gfn_throughput.py` as

    /work/peer-venv/bin/python benchmarks/torchgfn_peer.py --ndim 4 --height 8 --batch-size 16
    /work/peer-venv/bin/python benchmarks/torchgfn_peer.py --env bitseq --n-bits 32 \
        --word-size 4 --targets targets.pt --batch-size 16

The model and the iteration follow torchgfn's `tutorials/examples/train_hypergrid.py` with
`--loss TB --tied` and no replay buffer: KHotPreprocessor, an MLP P_F and a P_B MLP on the same
trunk (DiscretePolicyEstimator each), TBGFlowNet(init_logZ=0), AdamW with log Z in its own
group, and per iteration `sample_trajectories(save_logprobs=True)` (on-policy, so the loss
reuses the sampling log-probs), `to_training_samples`, `zero_grad`, `loss(reduction="mean")`,
`backward`, `step`. The script's per-iteration bookkeeping (visited states, modes, logging)
is not timed. Environments are built with torchgfn's default `debug=False`, its fastest
setting. On torchgfn's BitSequence the same model eats kinetic's encoding (each slot one-hot
over {empty, word 0, ...}) and the targets are those of kinetic's run.

Protocol: one JSON object per line on stdin, one reply per line on stdout (library output is
sent to stderr so that stdout carries replies only):

    {"cmd": "train", "iters": n}   -> {"ms": [n per-iteration wall times]}
    {"cmd": "dump", "path": p}     -> {"ok": true}; HyperGrid: torch.save of the forward
                                      log-probs (masked, -inf on illegal actions) on every
                                      grid state
    {"cmd": "dump_states", "path": p, "out": q}
                                   -> {"ok": true}; the same log-probs on the states saved at
                                      p, saved at q
    {"cmd": "quit"}                -> exits
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def build_env(args: argparse.Namespace):
    """torchgfn's environment and the state encoding kinetic's policy eats: HyperGrid with
    KHotPreprocessor, or BitSequence with each slot one-hot over {empty, word 0, ...} and the
    targets kinetic's run drew (so both learn the same reward)."""
    from gfn.preprocessors import KHotPreprocessor, Preprocessor

    if args.env == "hypergrid":
        from gfn.gym import HyperGrid

        env = HyperGrid(
            args.ndim,
            args.height,
            device="cpu",
            reward_fn_str="original",
            reward_fn_kwargs={"R0": args.R0, "R1": args.R1, "R2": args.R2},
        )
        return env, KHotPreprocessor(height=args.height, ndim=args.ndim)

    from gfn.gym import BitSequence

    targets = torch.load(args.targets)  # (|M|, n) 0/1, kinetic's BitSequence.targets
    env = BitSequence(
        word_size=args.word_size,
        seq_size=args.n_bits,
        n_modes=targets.shape[0],
        temperature=args.temperature,
        device_str="cpu",
    )
    env.modes = targets.long()  # log_reward reads the modes from here
    n_classes = 2**args.word_size + 1  # empty, then the words

    class SlotOneHot(Preprocessor):
        """kinetic's BitSequence.featurize: each slot one-hot over {empty, word 0, ...}."""

        def preprocess(self, states):
            # The sink state's slots hold 2^k; it is never scored, but must encode.
            slots = (states.tensor + 1).clamp(max=n_classes - 1)
            return torch.nn.functional.one_hot(slots, n_classes).flatten(-2).float()

    return env, SlotOneHot(output_dim=env.words_per_seq * n_classes)


def build(args: argparse.Namespace):
    """The environment, the TB GFlowNet and its optimizer, as `train_hypergrid.py` builds them."""
    from gfn.estimators import DiscretePolicyEstimator
    from gfn.gflownet import TBGFlowNet
    from gfn.utils.common import set_seed
    from gfn.utils.modules import MLP

    set_seed(args.seed)
    env, preprocessor = build_env(args)
    pf_module = MLP(
        input_dim=preprocessor.output_dim,
        output_dim=env.n_actions,
        hidden_dim=args.hidden,
        n_hidden_layers=args.n_layers,
    )
    pb_module = MLP(  # --tied: P_B is a head on P_F's trunk
        input_dim=preprocessor.output_dim,
        output_dim=env.n_actions - 1,
        hidden_dim=args.hidden,
        n_hidden_layers=args.n_layers,
        trunk=pf_module.trunk,
    )
    pf = DiscretePolicyEstimator(pf_module, env.n_actions, preprocessor=preprocessor)
    pb = DiscretePolicyEstimator(
        pb_module, env.n_actions, preprocessor=preprocessor, is_backward=True
    )
    gflownet = TBGFlowNet(pf=pf, pb=pb, init_logZ=0.0)
    named = dict(gflownet.named_parameters())  # the shared trunk appears once
    optimizer = torch.optim.AdamW(
        [
            {
                "params": [v for k, v in named.items() if k != "logZ"],
                "lr": args.lr,
                "weight_decay": args.weight_decay,
            },
            {"params": [named["logZ"]], "lr": args.lr_logz, "weight_decay": 0.0},
        ]
    )
    return env, gflownet, optimizer


def train(env, gflownet, optimizer, batch_size: int, iters: int) -> list[float]:
    """`iters` training iterations; wall milliseconds of each."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        trajectories = gflownet.sample_trajectories(
            env,
            n=batch_size,
            save_logprobs=True,  # on-policy: the loss reuses these
            save_estimator_outputs=False,
            epsilon=0.0,
            temperature=1.0,
        )
        training_samples = gflownet.to_training_samples(trajectories)
        optimizer.zero_grad()
        loss = gflownet.loss(
            env, training_samples, recalculate_all_logprobs=False, reduction="mean"
        )
        loss.backward()
        optimizer.step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


@torch.no_grad()
def dump_states(env, gflownet, path: str, out: str) -> None:
    """Save P_F's masked log-probs (-inf on illegal actions) on the states saved at `path`."""
    states = env.States(torch.load(path))
    dist = gflownet.pf.to_probability_distribution(states, gflownet.pf(states))
    torch.save(dist.logits.float(), out)


@torch.no_grad()
def dump(env, gflownet, path: str, chunk: int = 65_536) -> None:
    """Save P_F's masked log-probs on all height**ndim states, row-major (last coordinate
    fastest), with the states and their log-rewards, so the caller can check conventions."""
    place = env.height ** torch.arange(env.ndim - 1, -1, -1)  # (D,)
    flat = torch.arange(env.height**env.ndim)  # (N,)
    coords = flat.unsqueeze(1) // place % env.height  # (N, D)
    log_pf, log_rewards = [], []
    for start in range(0, coords.shape[0], chunk):
        states = env.States(coords[start : start + chunk].clone())
        out = gflownet.pf(states)
        dist = gflownet.pf.to_probability_distribution(states, out)
        log_pf.append(dist.logits.float())  # (n, A), normalized, -inf where masked
        log_rewards.append(env.reward(states).log())  # (n,)
    torch.save(
        {"states": coords, "log_pf": torch.cat(log_pf), "log_rewards": torch.cat(log_rewards)},
        path,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", choices=("hypergrid", "bitseq"), default="hypergrid")
    parser.add_argument("--ndim", type=int, default=4)
    parser.add_argument("--height", type=int, default=8)
    parser.add_argument("--n-bits", type=int, default=32)
    parser.add_argument("--word-size", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--targets", help="bitseq: torch.save of the targets (|M|, n), 0/1")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--R0", type=float, default=0.1)
    parser.add_argument("--R1", type=float, default=0.5)
    parser.add_argument("--R2", type=float, default=2.0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-logz", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    replies = sys.stdout
    sys.stdout = sys.stderr  # keep library prints off the reply channel
    torch.set_num_threads(args.threads)
    import gfn

    env, gflownet, optimizer = build(args)

    def reply(obj: dict) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    reply(
        {
            "ready": True,
            "torch": torch.__version__,
            "torchgfn": getattr(gfn, "__version__", "?"),
            "threads": torch.get_num_threads(),
        }
    )
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "train":
            reply({"ms": train(env, gflownet, optimizer, args.batch_size, request["iters"])})
        elif request["cmd"] == "dump":
            dump(env, gflownet, request["path"])
            reply({"ok": True})
        elif request["cmd"] == "dump_states":
            dump_states(env, gflownet, request["path"], request["out"])
            reply({"ok": True})
        elif request["cmd"] == "quit":
            break
        else:
            raise ValueError(
                f"Unknown command: {request['cmd']!r}; valid: train, dump, dump_states, quit"
            )


if __name__ == "__main__":
    main()
