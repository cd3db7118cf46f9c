"""fuse_wkv on the tiny synthetic model: the op types it leaves, agreement with the unfused graph
(ORT with its graph optimizations off, so we test OUR graph) and with the numpy reference for
T in (1, 2, 63, 64, 65, 1000) and batch 1 and 3 from a carried state, the full onnx check, the
structural match (names stripped) and the models it must refuse."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper

from rwkv_opt.checkpoint.synth import synthetic_state_dict
from rwkv_opt.checkpoint.weights import from_state_dict
from rwkv_opt.graph import contract
from rwkv_opt.graph.builder import FLOAT, GraphBuilder
from rwkv_testutil import ort_session
from rwkv_opt.graph.model import build_model
from rwkv_opt.passes import PassRefused, get_pass
from rwkv_opt.passes.base import applied_passes
from rwkv_opt.passes.fuse_wkv import FuseMode, find_wkv_scans
from rwkv_opt.reference import ReferenceModel
from rwkv_opt.reference.model import State

TOL = 2e-5
LENGTHS = (1, 2, 63, 64, 65, 1000)
CONFIGS = {
    "auto": {},  # T == 1 step, T < 32 Scan, else chunked
    "auto-min2": {"min_chunked_len": 2, "chunk": 32},  # T == 1 step, else chunked
    "chunked": {"mode": FuseMode.CHUNKED, "chunk": 16},
    "function": {"mode": FuseMode.FUNCTION},  # rwkv7.WKV7 nodes, the auto dispatch as their body
}


@functools.lru_cache(maxsize=None)
def weights():
    return from_state_dict(synthetic_state_dict("tiny").materialize())


@functools.lru_cache(maxsize=None)
def base():
    return build_model(weights())


@functools.lru_cache(maxsize=None)
def reference_model():
    return ReferenceModel(weights())


@functools.lru_cache(maxsize=None)
def fused(name: str):
    P = get_pass("fuse_wkv")
    return P(P.Config(**CONFIGS[name]))(base())


@functools.lru_cache(maxsize=None)
def session(name: str | None, optimize: bool = False):
    return ort_session(base() if name is None else fused(name).model, optimize=optimize)


def all_ops(graph: onnx.GraphProto) -> Counter:
    ops = Counter(n.op_type for n in graph.node)
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                ops += all_ops(a.g)
    return ops


def carried_feed(cfg, B: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    feed = {}
    for i in range(cfg.n_layer):
        att, wkv, ffn = contract.state_inputs(i)
        feed[att] = rng.standard_normal((B, 1, cfg.n_embd)).astype(np.float32)
        feed[wkv] = 0.3 * rng.standard_normal((B, cfg.n_head, cfg.head_size, cfg.head_size)).astype(np.float32)
        feed[ffn] = rng.standard_normal((B, 1, cfg.n_embd)).astype(np.float32)
    return feed


def run(sess, feed):
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def rel(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max() / np.std(b)


@functools.lru_cache(maxsize=None)
def case(T: int, B: int):
    """Inputs from a carried state, the unfused outputs and the fp64 reference (shared by configs)."""
    cfg = weights().config
    feed = carried_feed(cfg, B, seed=10 * T + B)
    feed["x"] = np.random.default_rng(T + B).integers(0, cfg.vocab, (B, T))
    L = cfg.n_layer
    state = State(
        *(np.stack([feed[contract.state_inputs(i)[j]] for i in range(L)]).astype(np.float64) for j in range(3))
    )
    state.att, state.ffn = state.att[:, :, 0], state.ffn[:, :, 0]
    return feed, run(session(None), feed), reference_model().forward(feed["x"], state)


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_unfused_and_reference(name, T):
    for B in (1, 3):
        feed, want, (logits, st) = case(T, B)
        got = run(session(name), feed)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].shape == want[k].shape, k
            assert rel(got[k], want[k]) <= TOL, f"{k} vs unfused: {rel(got[k], want[k]):.2e}"
        assert rel(got["head"], logits) <= TOL
        for i in range(weights().config.n_layer):
            att, wkv, ffn = contract.state_outputs(i)
            assert rel(got[wkv], st.wkv[i]) <= TOL, f"{wkv}: {rel(got[wkv], st.wkv[i]):.2e}"
            assert rel(got[att][:, 0], st.att[i]) <= TOL and rel(got[ffn][:, 0], st.ffn[i]) <= TOL


def test_ort_optimized_session_agrees():
    cfg = weights().config
    for T in (1, 5, 70):
        feed = {**carried_feed(cfg, 2, T), "x": np.arange(2 * T).reshape(2, T) % cfg.vocab}
        got, want = run(session("auto", optimize=True), feed), run(session(None), feed)
        assert max(rel(got[k], want[k]) for k in want) <= TOL


@pytest.mark.parametrize(
    "name,top,nested",
    [
        ("auto", {"If": 2, "Scan": 0}, {"If": 4, "Scan": 4}),
        ("auto-min2", {"If": 2, "Scan": 0}, {"If": 2, "Scan": 2}),
        ("chunked", {"If": 0, "Scan": 2}, {"If": 0, "Scan": 2}),
    ],
)
def test_op_types_and_checker(name, top, nested):
    res = fused(name)
    m = res.model
    onnx.checker.check_model(m, full_check=True)
    assert res.changed and applied_passes(m) == ["fuse_wkv"]
    ops, deep = Counter(n.op_type for n in m.graph.node), all_ops(m.graph)
    assert {k: ops[k] for k in top} == top and {k: deep[k] for k in nested} == nested
    assert deep["Log"] == 0, "log w should be read before its Exp, not recomputed"
    top_names = {n.name for n in m.graph.node}
    assert not top_names & {"/blocks.0/att/wkv/Squeeze", "/blocks.1/att/wkv/Squeeze"}, "y's Squeeze is absorbed"
    assert not find_wkv_scans(m.graph)
    assert [o.name for o in m.graph.output] == [o.name for o in base().graph.output]
    if name == "auto":  # the original Scan survives, under its name, inside the short-T branch
        names = {n.name for b in _subgraphs(m.graph) for n in b.node}
        assert {"/blocks.0/att/wkv/Scan", "/blocks.1/att/wkv/Scan"} <= names


def test_function_mode_one_custom_domain_node_per_layer():
    """mode=function: the only WKV at the top level is one rwkv7.WKV7 node per layer, named under
    /wkv/ (so precision passes keep it fp32); the model carries its function, whose body holds the
    step / Scan / chunked dispatch; the full checker accepts it (ORT agreement: the T x B test above)."""
    m, L = fused("function").model, weights().config.n_layer
    onnx.checker.check_model(m, full_check=True)
    wkv = [n for n in m.graph.node if n.domain == "rwkv7"]
    assert [n.op_type for n in wkv] == ["WKV7"] * L and all("/wkv/" in n.name for n in wkv)
    assert Counter(n.op_type for n in m.graph.node)["If"] == 0 and not find_wkv_scans(m.graph)
    assert [(f.domain, f.name, list(f.input), list(f.output)) for f in m.functions] == [
        ("rwkv7", "WKV7", ["r", "w", "k", "v", "kk", "b", "state"], ["y", "state_out"])
    ]
    body = Counter(n.op_type for n in m.functions[0].node)
    assert body["If"] == 1 and body["Constant"] > 0 and all_ops(m.graph)["Scan"] == 0
    assert ("rwkv7", 1) in [(o.domain, o.version) for o in m.opset_import]
    fp16 = get_pass("fp16_mixed")()(base()).model  # precision first, as targets do
    P = get_pass("fuse_wkv")
    from rwkv_opt.passes._state_path import state_path_violations

    assert state_path_violations(P(P.Config(mode=FuseMode.FUNCTION))(fp16).model) == []


def _numpy_wkv7(r, w, k, v, kk, b, state):
    """The recurrence itself, token by token (float64): S <- S diag(w) - (S kk^T) b + v^T k, y = S r^T."""
    S, ys = state.astype(np.float64), []
    for t in range(r.shape[1]):
        rt, wt, kt, vt, kkt, bt = (x[:, t].astype(np.float64) for x in (r, w, k, v, kk, b))  # (B,H,N)
        u = np.einsum("bhij,bhj->bhi", S, kkt)
        S = S * wt[:, :, None, :] - u[..., None] * bt[:, :, None, :] + vt[..., None] * kt[:, :, None, :]
        ys.append(np.einsum("bhij,bhj->bhi", S, rt))
    return np.stack(ys, 1).astype(np.float32), S.astype(np.float32)


def test_function_mode_runs_a_registered_kernel_instead_of_the_body():
    """What --wkv-op is for: a runtime that registers its own rwkv7.WKV7 kernel (here a numpy one,
    through onnxruntime-extensions) gets every WKV call, and the model's outputs match the unfused
    graph; without the kernel ORT runs the function body (the T x B test above)."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    import onnxruntime as ort

    calls = []

    @onnx_op(
        op_type="rwkv7::WKV7",
        inputs=[PyCustomOpDef.dt_float] * 7,
        outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
    )
    def wkv7(r, w, k, v, kk, b, state):
        calls.append(r.shape)
        return _numpy_wkv7(r, w, k, v, kk, b, state)

    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(fused("function").model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    cfg = weights().config
    for T, B in ((1, 1), (5, 3)):
        feed = {**carried_feed(cfg, B, seed=T), "x": np.arange(B * T).reshape(B, T) % cfg.vocab}
        want, got = run(session(None), feed), run(sess, feed)
        assert max(rel(got[k], want[k]) for k in want) <= TOL
    assert (
        calls == [(1, 1, cfg.n_head, cfg.head_size)] * cfg.n_layer + [(3, 5, cfg.n_head, cfg.head_size)] * cfg.n_layer
    )


def test_pipeline_wkv_op_flag(tmp_path):
    from rwkv_opt.cli import main
    from rwkv_opt.errors import RwkvOptError
    from rwkv_opt.targets import get_target

    assert main(["pipeline", "--target", "cpu-fp32", "--wkv-op", "-o", str(tmp_path / "a")]) == 0
    m = onnx.load(str(tmp_path / "a" / "model.onnx"))
    assert [f.name for f in m.functions] == ["WKV7"] and sum(n.op_type == "WKV7" for n in m.graph.node) == 2
    with pytest.raises(RwkvOptError, match="has no fuse_wkv pass"):
        from dataclasses import replace

        replace(get_target("cpu-fp32"), passes=(("simplify", {}),)).with_wkv_op()


def test_step_mode_is_a_decode_graph():
    """mode=step: no If, no Scan, nothing nested; equals the unfused graph and the reference at T == 1."""
    P = get_pass("fuse_wkv")
    m = P(P.Config(mode=FuseMode.STEP))(base()).model
    onnx.checker.check_model(m, full_check=True)
    deep = all_ops(m.graph)
    assert deep["If"] == 0 and deep["Scan"] == 0 and not list(_subgraphs(m.graph))
    sess = ort_session(m, optimize=False)
    for B in (1, 3):
        feed, want, (logits, st) = case(1, B)
        got = run(sess, feed)
        assert max(rel(got[k], want[k]) for k in want) <= TOL
        assert rel(got["head"], logits) <= TOL


def test_decode_path_runs_no_scan_input_ops():
    """The Scan's six Unsqueezes live in its own branch: the top level (run at every decode step)
    loses them, and no node is left whose output nobody reads."""
    m, L = fused("auto").model, weights().config.n_layer
    before = Counter(n.op_type for n in base().graph.node)["Unsqueeze"]
    assert Counter(n.op_type for n in m.graph.node)["Unsqueeze"] == before - 6 * L
    from rwkv_opt.passes.base import names_read

    read = names_read(m.graph)
    assert all(any(o in read for o in n.output) for n in m.graph.node)
    made = {o for n in m.graph.node for o in n.output}
    assert all(vi.name in made for vi in m.graph.value_info)  # no stale shape records
    assert all(t.name in read for t in m.graph.initializer)  # no orphaned constants


def _subgraphs(graph):
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield a.g
                yield from _subgraphs(a.g)


def test_matches_by_structure_not_names():
    """Names stripped everywhere (nodes and Scan bodies): the pass still finds both Scans."""
    m = onnx.ModelProto()
    m.CopyFrom(base())
    for n in m.graph.node:
        n.name = ""
    assert len(find_wkv_scans(m.graph)) == 2
    out = get_pass("fuse_wkv")()(m).model
    onnx.checker.check_model(out, full_check=True)
    cfg = weights().config
    feed = {**carried_feed(cfg, 1, 0), "x": np.arange(40).reshape(1, 40)}
    got, want = run(ort_session(out, optimize=False), feed), run(session(None), feed)
    assert max(rel(got[k], want[k]) for k in want) <= TOL


def test_bare_scan_without_unsqueeze_or_squeeze():
    """A Scan fed 5-D inputs directly, its 5-D y a graph output: Squeezes in, an Unsqueeze out."""
    H, N = 2, 64
    base_scan = next(n for n in base().graph.node if n.op_type == "Scan")
    g = GraphBuilder("bare")
    col, row = ["B", "T", H, N, 1], ["B", "T", H, 1, N]
    ins = [g.input(n, FLOAT, col if n in ("r", "v", "kk") else row) for n in ("r", "w", "k", "v", "kk", "b")]
    s0 = g.input("s0", FLOAT, ["B", H, N, N])
    attrs = {a.name: helper.get_attribute_value(a) for a in base_scan.attribute}
    s, y = g.op("Scan", s0, *ins, outputs=2, **attrs)
    g.output(y, "y", FLOAT, col)
    g.output(s, "s", FLOAT, ["B", H, N, N])
    m = g.model()
    out = get_pass("fuse_wkv")(get_pass("fuse_wkv").Config(min_chunked_len=8))(m).model
    onnx.checker.check_model(out, full_check=True)
    rng = np.random.default_rng(0)
    for T in (1, 4, 40):
        feed = {
            i.name: rng.standard_normal([3 if d == "B" else T if d == "T" else d for d in _dims(i)]).astype(np.float32)
            for i in m.graph.input
        }
        feed["w"] = np.exp(-0.6 * np.abs(feed["w"])).astype(np.float32)
        feed["kk"] /= np.linalg.norm(feed["kk"], axis=3, keepdims=True)
        feed["b"] = (feed["b"] * 0.1).astype(np.float32)
        got, want = run(ort_session(out, optimize=False), feed), run(ort_session(m, optimize=False), feed)
        assert rel(got["y"], want["y"]) <= TOL and rel(got["s"], want["s"]) <= TOL


def _dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_refuses_model_without_wkv_scan():
    with pytest.raises(PassRefused, match="no WKV Scan found"):
        get_pass("fuse_wkv")()(fused("auto").model)  # already fused: the Scans are inside Ifs
    g = GraphBuilder("plain")
    g.output(g.Relu(g.input("x", FLOAT, [2])), "y", FLOAT, [2])
    assert get_pass("fuse_wkv")().requires(g.model()) == "no WKV Scan found"


def test_refuses_bad_config_and_old_opset():
    P = get_pass("fuse_wkv")
    assert "chunk" in P.Config(chunk=40).problem()
    assert "min_chunked_len" in P.Config(min_chunked_len=0).problem()
    with pytest.raises(PassRefused, match="pass 'fuse_wkv' refused: .*chunk"):
        P.configure({"chunk": 40})(base())  # the base checks the config before anything else
    old = onnx.ModelProto()
    old.CopyFrom(base())
    old.opset_import[0].version = 17
    with pytest.raises(PassRefused, match="opset 17"):
        P()(old)
