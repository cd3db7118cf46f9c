"""graph/int8_twins.py: a 4-bit artifact's block MatMulNBits run as DynamicQuantizeMatMul over int8 twins of
their weights, made when a Session loads it; against MatMulNBits itself and the numpy reference."""

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph.int8_twins import applies, dequantize_nbits4, int8_twin, with_int8_twins
from rwkv_opt.passes import _quant_core as qc
from rwkv_opt.pipeline import run_pipeline
from rwkv_opt.reference.model import ReferenceModel
from rwkv_opt.runtime import Session
from rwkv_opt.targets import get_target

quiet = dict(do_verify=False, progress=lambda s: None)


@pytest.fixture(scope="module")
def int4(tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8_twins") / "cpu-int4"
    run_pipeline(get_target("cpu-int4"), tiny_weights, out, **quiet)
    return out, tiny_weights


def _one_node(node, inits, K: int, N: int) -> onnx.ModelProto:
    """`node` reading x (3, K) and writing y (3, N), over `inits`."""
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(qc.MS_DOMAIN, 1)])


@pytest.mark.parametrize("symmetric", [False, True], ids=["zero-points", "symmetric"])
@pytest.mark.parametrize(
    "K,N", [(96, 40), (128, 64), (80, 24), (64, 300)], ids=["3-blocks", "4-blocks", "partial-block", "N>panel"]
)
def test_dequantize_is_what_matmulnbits_multiplies_by(K, N, symmetric):
    """x @ dequantize_nbits4(B, scales, zero points) = MatMulNBits(x) (float compute), odd block counts
    (a padded zero-point nibble) and symmetric weights (implicit zero point 8) included."""
    rng = np.random.default_rng(K + symmetric)
    bq = qc.rtn(rng.standard_normal((K, N)).astype(np.float32), 4, 32, symmetric)
    node, inits = qc.matmul_nbits_node("mm", "x", "y", "w", bq, accuracy_level=0)
    model = _one_node(node, inits, K, N)
    x = rng.standard_normal((3, K)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    arrays = [numpy_helper.to_array(t) for t in inits]
    w = dequantize_nbits4(arrays[0], arrays[1], None if symmetric else arrays[2], K, N, 32)
    assert w.shape == (K, N)
    np.testing.assert_allclose(x @ w, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(w, bq.dequantize(), rtol=0, atol=1e-6 * np.abs(w).max())
    q8, scale = int8_twin(arrays[0], arrays[1], None if symmetric else arrays[2], K, N, 32)
    want_q8, want_scale = qc.int8_per_column(w)  # the fast path is the plain one, bit for bit
    assert np.array_equal(q8, want_q8) and np.array_equal(scale, want_scale) and q8.flags.c_contiguous


def _nbits_model(K: int, N: int, bias: bool = False, node_name: str = "/blocks.0/att/MatMul") -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    node, inits = qc.matmul_nbits_node(
        node_name, "x", "y", "w", qc.rtn(rng.standard_normal((K, N)).astype(np.float32), 4, 32, False), 4
    )
    if bias:
        node.input.extend(["", "", "bias"])
        inits.append(numpy_helper.from_array(np.zeros(N, np.float32), "bias"))
    return _one_node(node, inits, K, N)


def test_only_matmulnbits_it_understands_get_twins(tmp_path):
    """A block MatMulNBits of the shapes MatMulNBits defines gets a twin; one with a bias (or g_idx), one
    outside the blocks, or one whose B is not an initializer of its declared shape stays as it is."""
    assert applies(_nbits_model(96, 40))
    assert not applies(_nbits_model(96, 40, bias=True))
    assert not applies(_nbits_model(96, 40, node_name="/head/MatMul"))
    odd = _nbits_model(96, 40)
    b = odd.graph.initializer[0]
    b.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(b).reshape(40, -1), b.name))  # (N, K/2): not B's shape
    assert not applies(odd)
    twinned, arrays = with_int8_twins(_nbits_model(96, 40), tmp_path)
    assert [n.op_type for n in twinned.graph.node] == ["DynamicQuantizeMatMul"] and list(arrays) == [
        "/blocks.0/att/MatMul/int8_twin/0/q8"
    ]


def _rel(a, b):
    return float(np.abs(a - b).max() / b.std())


def test_twins_run_and_stay_as_close_to_the_reference(int4):
    """Default Session on cpu-int4: every block MatMulNBits became a DynamicQuantizeMatMul over a twin (the
    4-bit weights are not loaded); prompt and steps stay as close to the fp32 reference as the 4-bit kernels;
    the stepper still matches forward bit for bit; with decode_graph both rewrites compose."""
    art, weights = int4
    s, s4 = Session(art), Session(art, int8_twins=False)
    proto = onnx.load(str(art / "model.onnx"), load_external_data=False)
    n4 = sum(1 for n in proto.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/blocks."))
    assert n4 == 4 * weights.config.n_layer and s.int8_twins == n4 and not s4.int8_twins
    twinned, arrays = with_int8_twins(proto, art)
    ops = [n.op_type for n in twinned.graph.node if n.name.startswith("/blocks.")]
    assert "MatMulNBits" not in ops and len(arrays) == n4
    assert all(a.dtype == np.int8 and a.flags.c_contiguous for a in arrays.values())
    assert not any(t.name.endswith(".q4") and "/blocks." in t.name for t in twinned.graph.initializer)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, weights.config.vocab, (2, 40))
    ref = ReferenceModel(weights, np.float32)
    want, ref_state = ref.forward(toks, full_output=False)
    got8, st8 = s.forward(toks)
    got4, st4 = s4.forward(toks)
    assert not np.array_equal(got8, got4)  # the twins did run
    # int8 re-rounding of the 4-bit weights adds ~1/16 of a 4-bit step per weight: the error stays within a
    # quarter more than the 4-bit kernels' own (tiny 7 / 7a: 0.342 vs 0.353, 0.375 vs 0.376)
    err8, err4 = _rel(got8[:, -1], want[:, -1]), _rel(got4[:, -1], want[:, -1])
    assert err8 <= 1.25 * err4 + 0.02, (err8, err4)
    tok = rng.integers(0, weights.config.vocab, (2, 1))
    want1, _ = ref.forward(tok, ref_state, full_output=False)
    e8, e4 = _rel(s.forward(tok, st8)[0], want1[:, -1]), _rel(s4.forward(tok, st4)[0], want1[:, -1])
    assert e8 <= 1.25 * e4 + 0.02, (e8, e4)
    stepper, chain = s.stepper(st8), st8
    for _ in range(3):
        tok = rng.integers(0, weights.config.vocab, (2, 1))
        w, chain = s.forward(tok, chain)
        assert np.array_equal(stepper.step(tok)["head"], w)
    both = Session(art, decode_graph=True)
    assert both.int8_twins == n4 and both.decode_path
    a, sa = both.forward(tok, chain)
    b, sb = s.forward(tok, chain)
    assert np.array_equal(a, b) and all(np.array_equal(sa[k], sb[k]) for k in sb)


def test_only_where_it_applies(int4, tiny_weights, tmp_path):
    """low_memory turns it off unless asked for; an artifact without 4-bit MatMulNBits (cpu-int8) gets nothing."""
    art, _ = int4
    assert not Session(art, low_memory=True).int8_twins
    assert Session(art, low_memory=True, int8_twins=True).int8_twins
    run_pipeline(get_target("cpu-int8"), tiny_weights, tmp_path / "int8", **quiet)
    int8 = onnx.load(str(tmp_path / "int8" / "model.onnx"), load_external_data=False)
    assert with_int8_twins(int8, tmp_path) is None
    assert not Session(tmp_path / "int8").int8_twins


def test_cut_weights_are_one_sentence(int4, tmp_path):
    """The twins are read from model.onnx.data when the Session loads: a file cut short is one sentence."""
    art, _ = int4
    bad = tmp_path / "cut"
    bad.mkdir()
    shutil.copy(art / "manifest.json", bad)
    model = onnx.load(str(art / "model.onnx"))
    onnx.save(model, str(bad / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    data = bad / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    with pytest.raises(RwkvOptError, match="model.onnx") as e:
        Session(bad)
    assert "\n" not in str(e.value)
