"""The decode path (graph/decode.py): an artifact's graph specialised to T == 1, which Session runs for
one-token calls inside one If with the artifact's own graph.

What must hold: for every target ORT's CPU EP runs, the decode path gives bitwise model.onnx's
outputs at T == 1 from any state, with no If, Scan or token-shift Slice left in it; Session's one
graph gives bitwise model.onnx's outputs for prompts and steps alike, reads its weights from
model.onnx.data beside the artifact, and holds one packed copy of them; graphs with nothing to gain
are left alone.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rwkv_opt.graph.contract import Key, get_meta
from rwkv_opt.graph.decode import decode_graph, with_decode_path
from rwkv_opt.graph.model import build_model
from rwkv_opt.pipeline import run_pipeline
from rwkv_opt.runtime import Session
from rwkv_opt.targets import get_target

quiet = dict(progress=lambda _m: None, do_verify=False)


def _ort(model: onnx.ModelProto, folder=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if folder is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class _Reference:
    """onnx.reference (GPU-like rounding) with ORT's session interface: fp16 ops in fp16 as written.
    (ORT's CPU EP runs fp16 graphs by inserting fp32 casts and dropping Cast pairs where it can, so
    which roundings happen depends on the neighbours: the decode path's fp16 results differ there
    by an ulp.)"""

    def __init__(self, model, folder=None):
        from rwkv_opt.runtime.evaluator import rounding_evaluator  # onnx.reference, Scan over any axis

        self.model, self.ev = model, rounding_evaluator(model)

    def get_inputs(self):
        return _ort_like(self.model.graph.input)

    def get_outputs(self):
        return _ort_like(self.model.graph.output)

    def run(self, names, feed):
        return self.ev.run(names, feed)


def _ort_like(values):
    f16 = onnx.TensorProto.FLOAT16
    return [
        SimpleNamespace(
            name=v.name,
            shape=[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            type="tensor(float16)" if v.type.tensor_type.elem_type == f16 else "tensor(float)",
        )
        for v in values
    ]


def _random_state(sess, rng) -> dict:
    feed = {}
    for i in sess.get_inputs()[1:]:
        if i.name.startswith(("x_", "wkv_")):
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            feed[i.name] = (0.5 * rng.standard_normal([1 if isinstance(d, str) else d for d in i.shape])).astype(dtype)
    return feed


def _same_outputs(a, b, feed, what: str) -> None:
    outs = [o.name for o in a.get_outputs()]
    assert outs == [o.name for o in b.get_outputs()]
    for name, x, y in zip(outs, a.run(None, feed), b.run(None, feed)):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y), f"{what}: {name} differs by {np.abs(x.astype(float) - y).max()}"


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("target", ["cpu-fp32", "cpu-int8", "cpu-int4", "cuda-fp16"])
def test_decode_path_is_bitwise_model_at_t1(tiny7, tmp_path, target):
    art = tmp_path / target
    run_pipeline(get_target(target), tiny7, art, **quiet)
    model = onnx.load(str(art / "model.onnx"))
    dec = decode_graph(model)
    assert _ops(model)["If"] == tiny7.config.n_layer
    assert not {"If", "Scan", "Slice"} & set(_ops(dec)), _ops(dec)
    run = _Reference if target == "cuda-fp16" else _ort
    full, step = run(model), run(dec)
    rng = np.random.default_rng(0)
    for t in range(2):
        _same_outputs(full, step, {"x": rng.integers(0, 1024, (1, 1)), **_random_state(full, rng)}, f"step {t}")


def test_one_graph_session_rwkv7a_and_sampler(tiny_weights, tmp_path):
    """Session's graph (decode path inside an If) equals model.onnx's for prompts and steps."""
    art = tmp_path / "s"
    run_pipeline(get_target("cpu-int4"), tiny_weights, art, heads=[("sampling", {})], **quiet)
    model = onnx.load(str(art / "model.onnx"))
    plain, both = _ort(model), _ort(with_decode_path(model))
    rng = np.random.default_rng(1)
    for T in (1, 5, 1, 40):  # 40: fuse_wkv's chunked form inside the prompt branch
        feed = {"x": rng.integers(0, 1024, (1, T)), **_random_state(plain, rng), "uniform": np.array([rng.random()])}
        _same_outputs(plain, both, feed, f"T={T}")


def test_session_decode_path_reads_the_artifacts_data_and_packs_once(tmp_path):
    """A model over 64 MiB (weights in model.onnx.data): Session's one graph finds the data beside
    model.onnx from any cwd, gives model.onnx's logits, and holds one packed copy of the weights
    (two sessions would hold two: graph/decode.py)."""
    import subprocess
    import sys
    from dataclasses import replace

    from rwkv_opt.checkpoint.synth import SyntheticStateDict, synthetic_state_dict
    from rwkv_opt.checkpoint.weights import from_state_dict

    cfg = replace(synthetic_state_dict("tiny").config, vocab=65536, n_embd=256)  # 64 MiB head + emb
    art = tmp_path / "a"
    run_pipeline(get_target("cpu-fp32"), from_state_dict(SyntheticStateDict(cfg, seed=3).materialize()), art, **quiet)
    assert (art / "model.onnx.data").stat().st_size > 64 << 20
    probe = (
        "import sys, numpy as np\n"
        "from rwkv_opt.progress import rss_bytes\n"
        "from rwkv_opt.runtime import Session\n"
        "def rss():\n"
        "    return rss_bytes() >> 20\n"
        "r0 = rss(); s = Session(sys.argv[1], threads=1, decode_graph=sys.argv[2] == '1')\n"
        "l, st = s.forward(np.arange(7)[None]); l2, _ = s.forward([[3]], st)\n"
        "print(rss() - r0, s.decode_path, float(l2.sum()), float(l.sum()))\n"
    )
    got, repo = {}, Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}  # this checkout's rwkv_opt, run from another cwd
    for flag in ("0", "1"):
        cmd = [sys.executable, "-c", probe, str(art), flag]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        rss, used, *sums = r.stdout.split()
        got[flag] = (int(rss), used, sums)
    assert got["0"][1] == "False" and got["1"][1] == "True"
    assert got["0"][2] == got["1"][2]  # bitwise: same float reprs of the logit sums
    weights = (art / "model.onnx.data").stat().st_size >> 20
    assert got["1"][0] < got["0"][0] + weights // 2, got  # not a second packed copy of the weights


def test_session_one_token_calls_take_the_decode_path(tiny7, tmp_path):
    art = tmp_path / "a"
    run_pipeline(get_target("cpu-int8"), tiny7, art, **quiet)
    s, plain = Session(art, verify=True, decode_graph=True), Session(art)  # the decode path is opt-in
    assert s.decode_path and not plain.decode_path
    assert [n.op_type for n in onnx.load(str(art / "model.onnx")).graph.node].count("If") == tiny7.config.n_layer
    tokens = np.array([[1, 2, 3, 4, 5, 6, 7]])
    (la, sa), (lb, sb) = s.forward(tokens[:, :4]), plain.forward(tokens[:, :4])
    assert np.array_equal(la, lb)
    for t in range(4, 7):
        (la, sa), (lb, sb) = s.forward(tokens[:, t : t + 1], sa), plain.forward(tokens[:, t : t + 1], sb)
        assert np.array_equal(la, lb) and all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_no_decode_path_where_nothing_gains(tiny7, tmp_path):
    base = build_model(tiny7)  # the Scan graph, no fuse_wkv If
    assert decode_graph(base) is None and with_decode_path(base) is None
    art = tmp_path / "train"
    run_pipeline(get_target("cpu-fp32"), tiny7, art, heads=[("reinforce", {})], **quiet)
    assert get_meta(onnx.load(str(art / "model.onnx")), Key.TRAIN + "head") == "reinforce"
    assert decode_graph(onnx.load(str(art / "model.onnx"))) is None
