"""SIGTERM and Ctrl-C: the first finishes the step and checkpoints; a second exits at once.

Real signals to a real process: a small stand-in for the training loop runs in a subprocess.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kinetic import interrupt
from kinetic.interrupt import StopRequest, resume_command

LOOP = textwrap.dedent(
    """
    import importlib.util, sys, time

    # The module alone (standard library only), so the process starts in milliseconds.
    spec = importlib.util.spec_from_file_location("interrupt", sys.argv[2])
    interrupt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(interrupt)
    StopRequest = interrupt.StopRequest

    with StopRequest() as stop:
        print("ready", flush=True)
        for step in range(1, 100_000):
            time.sleep(0.01)  # one training step
            if stop.requested:
                print(f"step {step} finished", flush=True)
                time.sleep(float(sys.argv[1]))  # writing the checkpoint
                print(f"checkpoint written after {stop.signal}", flush=True)
                sys.exit(stop.exit_code)
    """
)


def _default_sigint() -> None:
    """In the child before Python starts: SIGINT at its default, so Python installs its
    KeyboardInterrupt handler even when the test runs as a background job (whose shell set
    SIGINT to "ignore", which the child would inherit and StopRequest would restore)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(checkpoint_seconds: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", LOOP, str(checkpoint_seconds), interrupt.__file__],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
    )  # fmt: skip
    assert process.stdout.readline().strip() == "ready"
    return process


@pytest.mark.parametrize(
    ("signum", "name"), [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")]
)
def test_the_first_signal_finishes_the_step_and_checkpoints(signum, name):
    process = _start(checkpoint_seconds=0.0)
    process.send_signal(signum)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 128 + signum
    lines = out.splitlines()
    assert lines[0].startswith("step ") and lines[0].endswith(" finished")
    assert lines[1] == f"checkpoint written after {name}"
    again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert err.strip() == (
        f"{name}: finishing this step and writing a checkpoint "
        f"({again} again to stop at once, without one)"
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_exits_at_once(signum):
    process = _start(checkpoint_seconds=60.0)  # a checkpoint that would take a minute
    process.send_signal(signum)
    assert process.stdout.readline().endswith(" finished\n")  # the first signal was received
    start = time.monotonic()
    process.send_signal(signum)
    out, err = process.communicate(timeout=30)
    assert time.monotonic() - start < 10
    assert "checkpoint written" not in out
    if signum == signal.SIGINT:  # Python's default: KeyboardInterrupt, then death by SIGINT
        assert "KeyboardInterrupt" in err
        assert process.returncode in (-signal.SIGINT, 128 + signal.SIGINT)
    else:
        assert process.returncode == -signal.SIGTERM


def test_handlers_are_restored_on_exit():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert signal.getsignal(signal.SIGINT) != before
        assert not stop.requested
    assert signal.getsignal(signal.SIGINT) == before


def test_the_resume_command_replaces_the_run_keys():
    command = resume_command(
        "runs/a b",
        ["env.height=4", "resume=path.pt", "overwrite=true", "hydra.run.dir=x", "seed=1"],
    )
    assert command == "python train.py env.height=4 seed=1 'hydra.run.dir=runs/a b' resume=auto"
