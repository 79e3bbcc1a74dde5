"""User errors at the config boundary become ConfigError; everything else keeps its type."""

from __future__ import annotations

import re

import pytest

from envs.hypergrid import HyperGrid
from kinetic.errors import ConfigError, call_with_config, refused_arguments


def test_an_environment_refusing_its_arguments_is_a_user_error_in_its_own_words():
    with pytest.raises(ConfigError, match=r"^env=HyperGrid: HyperGrid height must be >= 2, got 0$"):
        call_with_config(HyperGrid, {"ndim": 2, "height": 0}, "env=HyperGrid")
    with pytest.raises(ConfigError) as caught:
        call_with_config(HyperGrid, {"height": "tall"}, "env=HyperGrid")
    assert str(caught.value) == "env=HyperGrid: HyperGrid height must be an int, got 'tall'"
    assert isinstance(caught.value.__cause__, TypeError)  # the original, for debug=true


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
