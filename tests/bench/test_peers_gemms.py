"""benchmarks/peers.py's "GEMMs alone" runners: the graph of one decode step's weight GEMMs, as our Session runs
them, computes what those weights compute; and the report says, per bit width, whether the GEMMs alone leave
room for the decode goal."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rwkv_opt.artifact import model_path
from rwkv_opt.pipeline import run_pipeline
from rwkv_opt.runtime import Session
from rwkv_opt.targets import get_target

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import peers  # noqa: E402


def _feed(sess, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {i.name: [1 if d == "M" else d for d in i.shape] for i in sess.get_inputs()}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def test_fp32_gemms_alone_are_the_artifacts_weight_matmuls(tiny_dir):
    art = tiny_dir / "cpu-fp32"
    nbytes, sess = peers._matmuls_session(str(art), 1)
    m = onnx.load(str(model_path(art)))  # with its weights
    weights = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if len(t.dims) == 2}
    gemms = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(sess.get_outputs()) == len(gemms) > 0
    assert nbytes == sum(weights[w].nbytes for w in {n.input[1] for n in gemms})
    feed = _feed(sess)
    for n, y in zip(gemms, sess.run(None, feed), strict=True):
        w = weights[n.input[1]]
        x = feed[f"head_x{w.shape[0]}" if n.name.startswith("/head/") else f"x{w.shape[0]}"]
        np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def int4(tiny7, tmp_path_factory):
    out = tmp_path_factory.mktemp("peers") / "cpu-int4"
    run_pipeline(get_target("cpu-int4"), tiny7, out, do_verify=False, progress=lambda s: None)
    return out


def test_int4_gemms_alone_run_on_the_twins_as_the_session_does(int4, tiny7):
    """The blocks' 4-bit weights run on their int8 twins (DynamicQuantizeMatMul), as in a default Session, the
    others as the artifact has them; the twins' bytes are counted, not the 4-bit ones; every output is finite."""
    n4 = Session(int4).int8_twins
    assert n4 == 4 * tiny7.config.n_layer
    path = model_path(int4)
    twinned, arrays, nbytes = peers._matmuls_model(path)
    plain, none, nbytes4 = peers._matmuls_model(path, twins=False)
    ops, ops4 = (Counter(n.op_type for n in m.graph.node) for m in (twinned, plain))
    full = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    assert ops4["MatMulNBits"] == full["MatMulNBits"] and ops4["DynamicQuantizeMatMul"] == full["DynamicQuantizeMatMul"]
    assert ops["MatMulNBits"] == ops4["MatMulNBits"] - n4 >= 1  # the head stays 4-bit
    assert ops["DynamicQuantizeMatMul"] == ops4["DynamicQuantizeMatMul"] + n4
    assert len(arrays) == n4 and not none and nbytes > nbytes4  # an int8 twin is larger than its 4-bit weight
    _, sess = peers._matmuls_session(str(int4), 1)
    outs = sess.run(None, _feed(sess))
    assert len(outs) == sum(ops.values()) and all(np.isfinite(y).all() and y.shape[0] == 1 for y in outs)


def _results(kind, ms):
    return [{"kind": kind, "decode_ms_p50": ms, "weight_mib": 100.0}]


def test_report_says_whether_the_gemms_alone_leave_room_for_each_goal():
    summ = {
        ("ours", "decode_ms_p50"): (20.0, 19.0),
        ("theirs", "decode_ms_p50"): (35.0, 34.0),
        ("llama-f32", "decode_ms_p50"): (18.0, 17.0),
        ("ours-int8", "decode_ms_p50"): (9.0, 8.5),
        ("llama-q8_0", "decode_ms_p50"): (7.5, 7.0),
    }
    results = _results("matmuls", 17.0) + _results("matmuls-int8", 6.5)
    text = "\n".join(peers._matmuls_lines(results, 12.0, summ))
    fp32 = "| rwkv-opt cpu-fp32 | 100.0 | 20.00 | 17.00 | 3.00 (15%) | "
    assert fp32 + "official fp32 35.0 | 0.49x | 0.8x | yes |" in text
    assert fp32 + "llama.cpp f32 18.0 | 0.94x | 0.85x | **no** |" in text
    # 6.5 ms of GEMMs vs 0.8 x 7.5 = 6.0 ms allowed for the whole step
    int8 = "| rwkv-opt cpu-int8 | 100.0 | 9.00 | 6.50 | 2.50 (28%) | "
    assert int8 + "llama.cpp q8_0 7.5 | 0.87x | 0.8x | **no** |" in text
    assert "rwkv-opt cpu-int4" not in text  # not measured: no row
    assert "| T | artifact |" not in text  # no prompt figures in these rows
    assert "1.42x the bandwidth floor (12.0 ms)" in text
    assert peers._matmuls_lines([], 12.0, summ) == []


def test_report_says_what_the_prefill_goal_leaves_beside_the_gemms():
    summ = {("ours", "prefill_tok_s_128"): (800.0, 820.0), ("llama-f32", "prefill_tok_s_128"): (600.0, 610.0)}
    results = [{"kind": "matmuls", "decode_ms_p50": 17.0, "weight_mib": 100.0, "prefill_gemm_ms_128": 114.0}]
    text = "\n".join(peers._matmuls_lines(results, 12.0, summ))
    # our call 160 ms, llama.cpp's 213.3 ms; the goal allows 142.2 ms, of which the GEMMs take 114
    assert "| 128 | rwkv-opt cpu-fp32 | 160.0 | 114.0 | 46.0 | llama.cpp f32 213.3 | 142.2 | 28.2 |" in text
    assert "official fp32" not in text  # not measured


def test_gemms_alone_take_prompt_shaped_inputs(tiny_dir):
    """At M = T every block GEMM reads T rows; the head reads one."""
    result = peers.measure_matmuls(str(tiny_dir / "cpu-fp32"), [16], 4, 1)
    assert result["prefill_gemm_ms_16"] > 0 and result["decode_ms_p50"] > 0 and result["weight_mib"] > 0
    _, sess = peers._matmuls_session(str(tiny_dir / "cpu-fp32"), 1)
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert shapes.pop("head_x128") == [1, 128] and shapes and all(s[0] == "M" for s in shapes.values())


def test_plot_is_written_beside_the_report_and_skipped_without_figures(tmp_path):
    summ = {
        ("ours", "decode_ms_p50"): (20.0, 19.0),
        ("llama-f32", "decode_ms_p50"): (18.0, 17.0),
        ("ours", "prefill_tok_s_128"): (800.0, 820.0),
        ("llama-f32", "prefill_tok_s_128"): (600.0, 610.0),
    }
    results = _results("matmuls", 17.0)
    png = tmp_path / "p.png"
    assert peers.plot(png, results, summ, [128])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*tmp"))
    assert not peers.plot(tmp_path / "none.png", [], {}, [128]) and not (tmp_path / "none.png").exists()
