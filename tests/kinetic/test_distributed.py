"""kinetic.distributed in a single process: torchrun's environment, seeds, no-op collectives."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from kinetic import distributed


@pytest.fixture
def torchrun_env(monkeypatch):
    """Set torchrun's variables for rank `r` of `n` (no process group is created)."""

    def set_env(r: int, n: int, local: int | None = None) -> None:
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", str(n))
        monkeypatch.setenv("LOCAL_RANK", str(r if local is None else local))

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    return set_env


def test_single_process_defaults(torchrun_env) -> None:
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.is_main_process() and not distributed.is_distributed()
    assert distributed.init_from_env("cpu") is False
    assert distributed.agree({"run_dir": "x"}) == {"run_dir": "x"}
    distributed.barrier()
    distributed.shutdown()


def test_rank_from_torchrun_env(torchrun_env) -> None:
    torchrun_env(3, 4, local=1)
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (3, 4, 1)
    assert not distributed.is_main_process() and distributed.is_distributed()
    assert distributed.device_for_rank("cuda") == torch.device("cuda", 1)
    assert distributed.device_for_rank("cuda:0") == torch.device("cuda", 0)
    assert distributed.device_for_rank("cpu") == torch.device("cpu")


def test_init_without_rendezvous_variables_says_how_to_start(torchrun_env) -> None:
    torchrun_env(0, 2)
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT not set; start distributed"):
        distributed.init_from_env("cpu")


def test_init_refuses_devices_without_a_backend(torchrun_env, monkeypatch) -> None:
    torchrun_env(0, 2)
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match=r"^Invalid device for a distributed run: 'mps'"):
        distributed.init_from_env("mps")


def test_rank_seed_formula() -> None:
    # Rank 0 keeps the run's seed: a single-process run draws what it always drew.
    assert distributed.rank_seed(123, 0) == 123
    # Rank r > 0: numpy's SeedSequence(seed, spawn_key=(r,)), two 32-bit words in 63 bits.
    words = np.random.SeedSequence(123, spawn_key=(2,)).generate_state(2, dtype=np.uint32)
    assert distributed.rank_seed(123, 2) == (int(words[0]) << 31) ^ int(words[1])
    seeds = {distributed.rank_seed(s, r) for s in range(20) for r in range(1, 9)}
    assert len(seeds) == 160 and not seeds & set(range(20))  # no two streams share a seed
    assert all(0 <= s < 2**63 for s in seeds)
    torch.Generator().manual_seed(max(seeds))  # any of them seeds a torch generator
    with pytest.raises(ValueError, match=r"^Invalid rank: -1"):
        distributed.rank_seed(0, -1)


def test_per_rank_split(torchrun_env) -> None:
    assert distributed.per_rank(16, "task.batch_size") == 16
    torchrun_env(1, 4)
    assert distributed.per_rank(16, "task.batch_size") == 4
    message = (
        "Invalid task.batch_size: 10 is not a positive multiple of the number of processes (4); "
        "it is the global count, split evenly over the ranks"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        distributed.per_rank(10, "task.batch_size")


def test_single_process_wrappers_are_identities(torchrun_env) -> None:
    model = torch.nn.Linear(2, 2)
    assert distributed.data_parallel(model) is model
    x = torch.tensor(3.0)
    assert distributed.mean_over_ranks(x) is x


def test_auto_device_resolves_before_the_backend(torchrun_env, monkeypatch) -> None:
    torchrun_env(0, 2)
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: calls.append(a))
    assert distributed.init_from_env("auto") is True
    assert calls == [("gloo",)]
