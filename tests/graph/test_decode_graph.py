"""decode.onnx (graph/decode.py): the artifact's graph specialised to T == 1.

What must hold: for every target that ORT's CPU EP runs, decode.onnx gives bitwise the outputs of
model.onnx at T == 1 from any state, with no If, Scan or token-shift Slice left; its large weights
are model.onnx.data's; Session runs it for one-token calls and refuses a decode.onnx made from
another model.onnx; graphs with nothing to gain get none.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph.contract import Key, get_meta, set_meta
from rwkv_opt.graph.decode import DECODE_FILE, decode_graph, model_digest
from rwkv_opt.graph.model import build_model
from rwkv_opt.pipeline import run_pipeline
from rwkv_opt.runtime import Session
from rwkv_opt.targets import get_target

quiet = dict(progress=lambda _m: None, do_verify=False)


def _ort(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _random_state(sess, rng) -> dict:
    feed = {}
    for i in sess.get_inputs()[1:]:
        if i.name.startswith(("x_", "wkv_")):
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            feed[i.name] = (0.5 * rng.standard_normal([1 if isinstance(d, str) else d for d in i.shape])).astype(dtype)
    return feed


class _Reference:
    """onnx.reference (GPU-like rounding) with ORT's session interface: fp16 ops in fp16 as written.
    (ORT's CPU EP runs fp16 graphs by inserting fp32 casts and dropping Cast pairs where it can, so which roundings
    happen depends on the neighbours: the decode graph's fp16 results differ there by an ulp.)"""

    def __init__(self, path):
        from rwkv_opt.runtime.evaluator import rounding_evaluator  # onnx.reference, Scan over any axis

        self.model = onnx.load(str(path))
        self.ev = rounding_evaluator(self.model)

    def get_inputs(self):
        return _ort_like(self.model.graph.input)

    def get_outputs(self):
        return _ort_like(self.model.graph.output)

    def run(self, names, feed):
        return self.ev.run(names, feed)


def _ort_like(values):
    from types import SimpleNamespace

    from onnx.helper import tensor_dtype_to_string

    return [
        SimpleNamespace(
            name=v.name,
            shape=[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            type="tensor(float16)" if "FLOAT16" in tensor_dtype_to_string(v.type.tensor_type.elem_type) else "",
        )
        for v in values
    ]


def _bitwise_same_steps(art, extra=None, steps=3, runtime=_ort):
    """model.onnx and decode.onnx from the same random states: every output bitwise equal."""
    full, dec = runtime(art / "model.onnx"), runtime(art / DECODE_FILE)
    assert [o.name for o in full.get_outputs()] == [o.name for o in dec.get_outputs()]
    rng = np.random.default_rng(0)
    for step in range(steps):
        feed = {"x": rng.integers(0, 1024, (1, 1)), **_random_state(full, rng), **(extra or {})}
        a, b = full.run(None, feed), dec.run(None, feed)
        for o, x, y in zip(full.get_outputs(), a, b):
            assert x.dtype == y.dtype and x.shape == y.shape, o.name
            assert np.array_equal(x, y), f"step {step}: {o.name} differs by {np.abs(x - y).max()}"


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("target", ["cpu-fp32", "cpu-int8", "cpu-int4", "cuda-fp16"])
def test_decode_graph_is_bitwise_model_at_t1(tiny7, tmp_path, target):
    art = tmp_path / target
    man = run_pipeline(get_target(target), tiny7, art, **quiet)
    ops, full_ops = _ops(art / DECODE_FILE), _ops(art / "model.onnx")
    assert full_ops["If"] == tiny7.config.n_layer and not ops["If"] and not ops["Scan"] and not ops["Slice"], ops
    assert sum(ops.values()) < sum(full_ops.values()) + 15 * tiny7.config.n_layer  # the If branches' step nodes
    rec, files = man["decode_graph"], json.loads((art / "manifest.json").read_text())["files"]
    assert rec["file"] == DECODE_FILE and rec["nodes"] == sum(ops.values()) and DECODE_FILE in files
    _bitwise_same_steps(art, runtime=_Reference if target == "cuda-fp16" else _ort, steps=2)


def test_decode_graph_rwkv7a_and_sampler(tiny_weights, tmp_path):
    art = tmp_path / "s"
    run_pipeline(get_target("cpu-int4"), tiny_weights, art, heads=[("sampling", {})], **quiet)
    for u in (0.1, 0.9):  # the sampler's draw fed, so both graphs see the same randomness
        _bitwise_same_steps(art, extra={"uniform": np.array([u]), "temperature": np.array(0.8)}, steps=2)


def test_weights_are_model_data_references(tmp_path):
    from dataclasses import replace

    from rwkv_opt.checkpoint.synth import SyntheticStateDict, synthetic_state_dict
    from rwkv_opt.checkpoint.weights import from_state_dict

    cfg = replace(synthetic_state_dict("tiny").config, vocab=65536)  # > 64 MiB of weights: external data
    big = from_state_dict(SyntheticStateDict(cfg, seed=3).materialize())
    art = tmp_path / "a"
    run_pipeline(get_target("cpu-fp32"), big, art, **quiet)
    dec = onnx.load(str(art / DECODE_FILE), load_external_data=False)
    full = onnx.load(str(art / "model.onnx"), load_external_data=False)
    ext = lambda m: {t.name: list(t.external_data) for t in m.graph.initializer if t.external_data}  # noqa: E731
    assert ext(full) and ext(dec) == {k: v for k, v in ext(full).items() if k in ext(dec)}
    assert (art / DECODE_FILE).stat().st_size < 2 << 20 and not list(art.glob("decode.onnx.data*"))
    _bitwise_same_steps(art, steps=1)


def test_session_runs_decode_graph_for_one_token_calls(tiny7, tmp_path):
    art = tmp_path / "a"
    run_pipeline(get_target("cpu-int8"), tiny7, art, **quiet)
    s, plain = Session(art, verify=True), Session(art, decode_graph=False)
    assert s.decode_sess is not None and plain.decode_sess is None
    calls = []
    s.decode_sess.run = lambda names, feed, _run=s.decode_sess.run: calls.append(1) or _run(names, feed)
    tokens = np.array([[1, 2, 3, 4, 5, 6, 7]])
    (la, sa), (lb, sb) = s.forward(tokens[:, :4]), plain.forward(tokens[:, :4])
    assert not calls and np.array_equal(la, lb)
    for t in range(4, 7):
        (la, sa), (lb, sb) = s.forward(tokens[:, t : t + 1], sa), plain.forward(tokens[:, t : t + 1], sb)
        assert np.array_equal(la, lb) and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert len(calls) == 3


def test_decode_graph_of_another_model_is_refused(tiny7, tmp_path):
    art = tmp_path / "a"
    run_pipeline(get_target("cpu-fp32"), tiny7, art, **quiet)
    m = onnx.load(str(art / DECODE_FILE))
    set_meta(m, Key.DECODE_OF, "0" * 64)
    onnx.save(m, str(art / DECODE_FILE))
    with pytest.raises(RwkvOptError, match=r"decode\.onnx was made from another model\.onnx .* rebuild the artifact"):
        Session(art)
    with pytest.raises(RwkvOptError, match="decode.onnx"):  # the manifest's digest says which file changed
        Session(art, verify=True)
    (art / DECODE_FILE).unlink()
    manifest = json.loads((art / "manifest.json").read_text())
    assert DECODE_FILE in manifest["files"]
    assert Session(art).decode_sess is None  # without it, model.onnx serves every call


def test_no_decode_graph_where_nothing_gains(tiny7, tmp_path):
    base = build_model(tiny7)  # the Scan graph, no fuse_wkv If
    assert decode_graph(base, model_digest(base.SerializeToString())) is None
    art = tmp_path / "train"
    bare = get_target("cpu-fp32")
    run_pipeline(bare, tiny7, art, heads=[("reinforce", {})], **quiet)
    assert get_meta(onnx.load(str(art / "model.onnx")), Key.TRAIN + "head") == "reinforce"
    assert not (art / DECODE_FILE).exists()


def test_old_artifact_without_decode_graph_still_runs(tiny7, tmp_path):
    art = tmp_path / "a"
    run_pipeline(get_target("cpu-fp32"), tiny7, art, **quiet)
    old = tmp_path / "old"
    old.mkdir()
    for f in ("model.onnx",):
        shutil.copy(art / f, old / f)
    s = Session(old)
    assert s.decode_sess is None
    logits, state = s.forward([[5]])
    assert logits.shape == (1, 1, tiny7.config.vocab)
