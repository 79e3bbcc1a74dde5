"""pyproject's lower bounds against the APIs the code calls.

Each entry names an API the code uses and the release of its package that introduced it (from
the package's release notes). The declared lower bound must be at least that release, and the
installed package must provide the API: lowering a bound below what the code needs, or calling
a newer API without raising the bound here, fails this test.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version


def _has_total_norm_api() -> bool:
    import torch

    return hasattr(torch.nn.utils, "get_total_norm") and hasattr(
        torch.nn.utils, "clip_grads_with_norm_"
    )


def _ema_has_foreach() -> bool:
    from diffusers.training_utils import EMAModel

    return "foreach" in inspect.signature(EMAModel).parameters


def _hydra_has_version_base() -> bool:
    import hydra

    return "version_base" in inspect.signature(hydra.main).parameters


def _omegaconf_has_select_resolver() -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.create({"a": "${oc.select:b,1}"}).a == 1


# package: (release that introduced the API, the API, a probe of the installed package)
NEEDED = {
    "torch": ("2.6", "torch.nn.utils.get_total_norm, clip_grads_with_norm_", _has_total_norm_api),
    "diffusers": ("0.28", "EMAModel(foreach=...)", _ema_has_foreach),
    "hydra-core": ("1.2", "hydra.main(version_base=...)", _hydra_has_version_base),
    "omegaconf": ("2.1", "the oc.select resolver", _omegaconf_has_select_resolver),
}


def _declared() -> dict[str, Requirement]:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)[1]
    names = re.findall(r'^\s*"([^"]+)"', block, re.M)
    return {Requirement(n).name: Requirement(n) for n in names}


def _lower_bound(requirement: Requirement) -> Version:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"{requirement}: expected one >= bound"
    return bounds[0]


@pytest.mark.parametrize("package", sorted(NEEDED))
def test_the_lower_bound_covers_the_api_the_code_calls(package):
    introduced, api, _ = NEEDED[package]
    bound = _lower_bound(_declared()[package])
    assert bound >= Version(introduced), f"{package}>={bound}, but {api} needs {introduced}"


@pytest.mark.parametrize("package", sorted(NEEDED))
def test_the_installed_package_provides_the_api(package):
    _, api, probe = NEEDED[package]
    assert probe(), f"the installed {package} lacks {api}"


def test_every_declared_dependency_is_installed_within_its_bound():
    for name, requirement in _declared().items():
        installed = Version(importlib.metadata.version(name))
        assert installed in requirement.specifier, f"{name} {installed} is outside {requirement}"
