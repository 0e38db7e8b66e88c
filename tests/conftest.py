from __future__ import annotations

import pytest

from ckptcheck.configs import load_config

from .writers import CONFIGS, FIXTURES


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_config(CONFIGS / "lingua_params.json")


@pytest.fixture(scope="session")
def tiny_state(tiny_cfg):
    from ckptcheck.synth import random_state_dict

    return random_state_dict(tiny_cfg, dtype="bfloat16", seed=0)
