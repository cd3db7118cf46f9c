"""The numpy reference (and the base ONNX graph) against BlinkDL's official `rwkv` package.

Tiny synthetic RWKV-7 and RWKV-7a checkpoints written by our torch-free writer, loaded by the
official package (`cpu fp32`): a 64-token prompt as one sequence, token by token, and in two
chunks; max|err| / std(ref) <= 1e-4, argmax identical, states agree.
"""

import numpy as np
import pytest

from rwkv_testutil import ort_session, run_oracle, zero_feed
from rwkv_opt.checkpoint.synth import synthetic_state_dict
from rwkv_opt.checkpoint.torchzip import write_pth
from rwkv_opt.checkpoint.weights import load_weights
from rwkv_opt.graph.model import build_model
from rwkv_opt.reference import ReferenceModel

TOL = 1e-4


def rel(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max() / np.std(b)


@pytest.fixture(scope="module", params=[False, True], ids=["rwkv7", "rwkv7a"])
def oracle_case(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("oracle")
    ckpt = d / "model.pth"
    write_pth(ckpt, synthetic_state_dict("tiny", deepembed=request.param, seed=11))
    tokens = np.random.default_rng(5).integers(0, 1024, (2, 64))
    official = run_oracle(ckpt, tokens, request.param, d / "out.npz", split=23)
    return load_weights(ckpt), tokens, official


def test_reference_matches_official(oracle_case):
    weights, tokens, off = oracle_case
    ref = ReferenceModel(weights)
    for b, row in enumerate(tokens):
        lo, st = ref.forward(row)
        assert rel(off[f"seq_{b}"], lo[0]) <= TOL
        assert (off[f"seq_{b}"].argmax(-1) == lo[0].argmax(-1)).all()
        assert rel(off[f"seq_wkv_{b}"], st.wkv[:, 0]) <= TOL
        assert rel(off[f"seq_att_{b}"], st.att[:, 0]) <= TOL and rel(off[f"seq_ffn_{b}"], st.ffn[:, 0]) <= TOL
        # token by token, carrying state
        st, outs = None, []
        for t in row:
            lo, st = ref.forward([t], st)
            outs.append(lo[0, -1])
        assert rel(off[f"tok_{b}"], np.stack(outs)) <= TOL
        assert rel(off[f"tok_wkv_{b}"], st.wkv[:, 0]) <= TOL
        # two chunks
        lo1, st = ref.forward(row[:23])
        lo2, st = ref.forward(row[23:], st)
        assert rel(off[f"chunk_{b}"], np.concatenate([lo1[0], lo2[0]])) <= TOL
        assert rel(off[f"chunk_wkv_{b}"], st.wkv[:, 0]) <= TOL


def test_onnx_matches_official(oracle_case):
    """The base fp32 graph, batch 2 with different prompts, against the official per-row results."""
    weights, tokens, off = oracle_case
    cfg = weights.config
    sess = ort_session(build_model(weights))
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, {"x": tokens, **zero_feed(cfg, 2)})))
    for b in range(2):
        assert rel(off[f"seq_{b}"], out["head"][b]) <= TOL
        assert (off[f"seq_{b}"].argmax(-1) == out["head"][b].argmax(-1)).all()
        wkv = np.stack([out[f"wkv_next_{i}"][b] for i in range(cfg.n_layer)])
        assert rel(off[f"seq_wkv_{b}"], wkv) <= TOL


def test_deepembed_path_matters(tmp_path):
    """Guard against a silently ignored DeepEmbed: dropping its keys must change the logits."""
    from rwkv_opt.checkpoint.weights import from_state_dict

    sd = synthetic_state_dict("tiny", deepembed=True, seed=11).materialize()
    plain = {k: v for k, v in sd.items() if ".ffn.s" not in k}
    toks = np.arange(32) * 31 % 1024
    a, _ = ReferenceModel(from_state_dict(sd)).forward(toks)
    b, _ = ReferenceModel(from_state_dict(plain)).forward(toks)
    assert rel(a, b) > 0.1
