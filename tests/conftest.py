"""Shared fixtures: tiny synthetic checkpoints (RWKV-7 and RWKV-7a), built graphs, the oracle."""

from __future__ import annotations

import pytest

from rwkv_opt.checkpoint.synth import synthetic_state_dict
from rwkv_opt.checkpoint.weights import from_state_dict


@pytest.fixture(scope="session", params=[False, True], ids=["rwkv7", "rwkv7a"])
def tiny_weights(request):
    return from_state_dict(synthetic_state_dict("tiny", deepembed=request.param, seed=7).materialize())


@pytest.fixture(scope="session")
def tiny7():
    return from_state_dict(synthetic_state_dict("tiny", seed=7).materialize())
