"""Runtime Session over a real artifact: metadata-driven state, batch, chunked long prompts."""

import numpy as np
import pytest

from rwkv_opt.artifact import MODEL_FILE, save_model
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph.model import BuildOptions, LogitsMode, build_model
from rwkv_opt.reference import ReferenceModel
from rwkv_opt.runtime import Session


@pytest.fixture(scope="module")
def artifacts(tiny7, tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    for mode in LogitsMode:
        (d / mode.value).mkdir()
        save_model(build_model(tiny7, BuildOptions(logits=mode)), d / mode.value / MODEL_FILE)
    return d


def rel(a, b):
    return np.abs(a - b).max() / b.std()


def test_forward_reads_metadata_and_carries_state(artifacts, tiny7):
    s = Session(artifacts / "all")
    assert s.config == tiny7.config and s.logits_mode == "all"
    tokens = np.random.default_rng(0).integers(0, 1024, (3, 40))
    lo, st = s.forward(tokens[:, :25])
    lo2, st = s.forward(tokens[:, 25:], st)
    want, _ = ReferenceModel(tiny7).forward(tokens)
    assert rel(np.concatenate([lo, lo2], 1), want) < 1e-4


def test_long_prompt_is_fed_in_chunks(artifacts, tiny7):
    s = Session(artifacts / "last", max_chunk=16)
    tokens = np.random.default_rng(1).integers(0, 1024, (1, 70))
    lo, st = s.forward(tokens)
    want, wst = ReferenceModel(tiny7).forward(tokens)
    assert lo.shape == (1, 1, 1024)
    assert rel(lo, want[:, -1:]) < 1e-4
    assert rel(st["wkv_state_1"], wst.wkv[1]) < 1e-4


def test_bad_tokens_and_missing_provider(artifacts):
    s = Session(artifacts / "last")
    with pytest.raises(RwkvOptError, match=r"token ids must be in \[0, 1024\)"):
        s.forward([[5000]])
    with pytest.raises(RwkvOptError, match="not available"):
        Session(artifacts / "last", provider="cuda")
