"""Shared fixtures: one quality-classifier cache for the whole session (training it takes
seconds, so every test that needs it reuses the first one's)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("classifier_cache")
