"""User errors at the config boundary become ConfigError; everything else keeps its type."""

from __future__ import annotations

import re

import pytest

from envs.hypergrid import HyperGrid
from kinetic.errors import ConfigError, call_with_config, refused_arguments


class _Walls:
    """A user's environment that refuses its arguments with plain ValueError and TypeError."""

    def __init__(self, height: int = 3) -> None:
        if not isinstance(height, int):
            raise TypeError(f"Walls height must be an int, got {height!r}")
        if height < 2:
            raise ValueError(f"Walls height must be >= 2, got {height}")


def test_an_environment_refusing_its_arguments_is_a_user_error_in_its_own_words():
    with pytest.raises(ConfigError, match=r"^env=Walls: Walls height must be >= 2, got 0$"):
        call_with_config(_Walls, {"height": 0}, "env=Walls")
    with pytest.raises(ConfigError) as caught:
        call_with_config(_Walls, {"height": "tall"}, "env=Walls")
    assert str(caught.value) == "env=Walls: Walls height must be an int, got 'tall'"
    assert isinstance(caught.value.__cause__, TypeError)  # the original, for debug=true
    # A built-in environment's own checks already speak the shared dialect: kept as they are.
    with pytest.raises(ConfigError, match=r"^Invalid env\.height: 0; expected an int >= 2$"):
        call_with_config(HyperGrid, {"ndim": 2, "height": 0}, "env=HyperGrid")


def test_an_unknown_key_names_the_valid_ones():
    with pytest.raises(ConfigError, match=re.escape(
        "env=HyperGrid: HyperGrid does not accept these keys (got an unexpected keyword argument "
        "'heigth'); valid keys: ndim, height, R0, R1, R2, device"
    )):  # fmt: skip
        call_with_config(HyperGrid, {"heigth": 3}, "env=HyperGrid")


def test_other_exceptions_keep_their_type_and_traceback():
    def buggy(**kwargs):
        raise RuntimeError("an internal bug")

    with pytest.raises(RuntimeError, match=r"^an internal bug$"):
        call_with_config(buggy, {}, "env")
    with pytest.raises(KeyError), refused_arguments("optim"):
        raise KeyError("bug")
    assert issubclass(ConfigError, ValueError)  # code catching ValueError keeps working
