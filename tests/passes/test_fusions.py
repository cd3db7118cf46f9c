"""fuse_token_shift_lerp and fuse_lora on the tiny synthetic model (L=2): the op types each leaves,
agreement with the graph before the pass (ORT with its graph optimizations off, so we test OUR
graph) on logits and every state for batch 1 and 3 and T 1 and 17 from a random carried state, the
full onnx check, the structural match in graphs the rules did not build (onnxsim's output, names
stripped, mixes behind fp16 Casts) and the models each rule must refuse, with their reasons."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import onnxsim
import pytest
from onnx import TensorProto, helper, numpy_helper

from rwkv_testutil import ort_session
from rwkv_opt.checkpoint.synth import synthetic_state_dict
from rwkv_opt.checkpoint.weights import from_state_dict
from rwkv_opt.graph.model import build_model
from rwkv_opt.passes import PassRefused
from rwkv_opt.passes.base import applied_passes
from rwkv_opt.passes.experimental.fuse_token_shift_lerp import Config as LerpConfig
from rwkv_opt.passes.experimental.fuse_token_shift_lerp import FuseTokenShiftLerp, Unstack
from rwkv_opt.passes.experimental.fuse_lora import Config as LoraConfig
from rwkv_opt.passes.experimental.fuse_lora import FuseLora

L = 2  # tiny preset layers
TOL = 1e-5
SHAPES = [(1, 1), (1, 17), (3, 1), (3, 17)]  # (batch, T)

LERP = FuseTokenShiftLerp()
LERP_SPLIT = FuseTokenShiftLerp(LerpConfig(unstack=Unstack.SPLIT))
LERP_RKV = FuseTokenShiftLerp(LerpConfig(batch_projections=True))
LORA = FuseLora()

# rule name -> (passes applied in order, expected op-count change vs the base graph for L=2)
RULES = {
    # per layer: 6 Mul + 6 Add -> 1 Mul + 1 Add + 6 Gather
    "lerp": ([LERP], {"Mul": -5 * L, "Add": -5 * L, "Gather": 6 * L}),
    # per layer: 6 Mul + 6 Add -> 1 Mul + 1 Add + Split + 6 Squeeze
    "lerp_split": ([LERP_SPLIT], {"Mul": -5 * L, "Add": -5 * L, "Split": L, "Squeeze": 6 * L}),
    # r,k,v: 3 MatMul -> Slice + 1 MatMul + 3 Gather; x_r, x_k lose their Gather (layer 0 x_v too)
    "lerp_rkv": ([LERP_RKV], {"Mul": -5 * L, "Add": -5 * L, "MatMul": -2 * L, "Slice": L, "Gather": 7 * L - 1}),
    # layers >= 1: value + v1 (both read x_v) -> 1 MatMul + Split
    "lora": ([LORA], {"MatMul": -(L - 1), "Split": L - 1}),
    # after lerp: w1 + a1 (stack slots 1 and 4) -> Gather[1,4] + 1 batched MatMul + 2 Gather (x_w, x_a
    # lose theirs); layers >= 1 also concat value + v1
    "lerp+lora": (
        [LERP, LORA],
        {"Mul": -5 * L, "Add": -5 * L, "Gather": 7 * L, "MatMul": -L - (L - 1), "Split": L - 1},
    ),
    # after lerp_rkv: w1 + a1 are stack slots 3 and 4 -> Slice
    "lerp_rkv+lora": (
        [LERP_RKV, LORA],
        {"Mul": -5 * L, "Add": -5 * L, "MatMul": -3 * L, "Slice": 2 * L, "Gather": 7 * L - 1},
    ),
}


@functools.lru_cache(maxsize=None)
def base() -> onnx.ModelProto:
    return build_model(from_state_dict(synthetic_state_dict("tiny").materialize()))


@functools.lru_cache(maxsize=None)
def foreign(kind: str) -> onnx.ModelProto:
    """The base graph as another tool would hand it over."""
    if kind == "built":
        return base()
    if kind == "onnxsim":
        model, ok = onnxsim.simplify(base())
        assert ok
        return model
    if kind == "stripped":
        return strip_names(base())
    if kind == "fp16_mix_casts":
        return mixes_behind_casts(base())
    raise KeyError(kind)


def strip_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Re-serialised with every node name cleared and every internal tensor renamed t0, t1, ..."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    io = {v.name for v in [*m.graph.input, *m.graph.output]}
    new = {}
    for init in m.graph.initializer:
        new[init.name] = init.name = f"t{len(new)}"
    for node in m.graph.node:
        node.name = ""
        for j, o in enumerate(node.output):
            if o not in io:
                new[o] = node.output[j] = f"t{len(new)}"
        for j, i in enumerate(node.input):
            node.input[j] = new.get(i, i)
    del m.graph.value_info[:]
    return m


def mixes_behind_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """The time-mix lerp mixes stored fp16 and Cast to fp32, as a precision pass would leave them."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    casts = []
    for init in m.graph.initializer:
        if ".att.x_" in init.name:
            half = numpy_helper.to_array(init).astype(np.float16)
            init.CopyFrom(numpy_helper.from_array(half, init.name + ".fp16"))
            casts.append(helper.make_node("Cast", [init.name], [init.name[: -len(".fp16")]], to=TensorProto.FLOAT))
    assert len(casts) == 6 * L
    nodes = casts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def apply(passes, model: onnx.ModelProto) -> onnx.ModelProto:
    for p in passes:
        result = p(model)
        assert result.changed, result.notes
        model = result.model
    return model


@functools.lru_cache(maxsize=None)
def fused(rule: str, kind: str = "built") -> onnx.ModelProto:
    return apply(RULES[rule][0], foreign(kind))


def feed(model: onnx.ModelProto, batch: int, T: int) -> dict:
    rng = np.random.default_rng(batch * 100 + T)
    out = {}
    for vi in model.graph.input:
        dims = [batch if d.dim_param == "batch" else d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.name == "x":
            out["x"] = rng.integers(0, 1024, (batch, T)).astype(np.int64)
        else:
            out[vi.name] = (0.5 * rng.standard_normal(dims)).astype(np.float32)
    return out


@functools.lru_cache(maxsize=None)
def outputs(rule: str | None, kind: str, batch: int, T: int) -> dict:
    model = foreign(kind) if rule is None else fused(rule, kind)
    sess = ort_session(model, optimize=False)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed(model, batch, T))))


def op_delta(after: onnx.ModelProto, before: onnx.ModelProto) -> dict:
    d = Counter(n.op_type for n in after.graph.node)
    d.subtract(Counter(n.op_type for n in before.graph.node))
    return {k: v for k, v in d.items() if v}


@pytest.mark.parametrize("rule", list(RULES))
def test_op_types_after_the_rule(rule):
    model = fused(rule)
    assert op_delta(model, base()) == RULES[rule][1]
    names = {p.name for p in RULES[rule][0]}
    assert set(applied_passes(model)) == names


def test_lerp_stack_is_one_mix_initializer_per_block():
    model = fused("lerp")
    inits = {i.name: i for i in model.graph.initializer}
    muls = [n for n in model.graph.node if n.op_type == "Mul" and "fuse_token_shift_lerp" in n.name]
    assert len(muls) == L
    for n in muls:
        assert list(inits[n.input[1]].dims) == [6, 1, 1, 128]
    assert not any(".att.x_" in name for name in inits), "the per-lerp mixes should be gone"


def test_lerp_rkv_drops_the_unbatched_weights():
    inits = {i.name: list(i.dims) for i in fused("lerp_rkv").graph.initializer}
    assert not any(k.endswith((".att.receptance.weight.T", ".att.key.weight.T", ".att.value.weight.T")) for k in inits)
    assert sum(d == [3, 1, 128, 128] for d in inits.values()) == L


@pytest.mark.parametrize("rule", list(RULES))
def test_full_onnx_check(rule):
    onnx.checker.check_model(fused(rule), full_check=True)


@pytest.mark.parametrize("batch,T", SHAPES)
@pytest.mark.parametrize("rule", list(RULES))
def test_agrees_with_the_graph_before(rule, batch, T):
    want, got = outputs(None, "built", batch, T), outputs(rule, "built", batch, T)
    assert set(got) == set(want)
    for name, ref in want.items():
        err = float(np.abs(got[name] - ref).max())
        assert err <= TOL * max(1.0, float(np.abs(ref).max())), f"{name}: max|err| {err}"


@pytest.mark.parametrize("kind", ["onnxsim", "stripped", "fp16_mix_casts"])
@pytest.mark.parametrize("rule", ["lerp", "lerp_rkv", "lora", "lerp_rkv+lora", "lerp+lora"])
def test_finds_its_pattern_in_a_graph_it_did_not_build(rule, kind):
    before, model = foreign(kind), fused(rule, kind)
    # the same rewrite as on our own graph, whatever onnxsim did around it
    expected = dict(RULES[rule][1])
    if kind == "fp16_mix_casts" and rule.startswith("lerp"):
        expected["Cast"] = -6 * L  # folded into the stacked mix
    got = op_delta(model, before)
    if kind == "onnxsim" and rule in ("lora", "lerp+lora", "lerp_rkv+lora"):
        # onnxsim turned the up-projections' MatMul+Add into Gemm; the downs still match
        assert {k: v for k, v in got.items() if k in expected} == expected
    else:
        assert got == expected
    onnx.checker.check_model(model, full_check=True)
    want, out = outputs(None, kind, 3, 17), outputs(rule, kind, 3, 17)
    for name, ref in want.items():
        assert float(np.abs(out[name] - ref).max()) <= TOL * max(1.0, float(np.abs(ref).max())), name


def test_lerp_refuses_a_graph_whose_lerps_are_already_stacked():
    # after the pass only the channel mix's single lerp per block remains: nothing to stack
    reason = LERP.requires(fused("lerp"))
    assert reason and "share the same x and delta" in reason
    with pytest.raises(PassRefused, match="share the same x and delta"):
        LERP(fused("lerp"))


def test_lerp_refuses_a_graph_without_lerps():
    assert "no Add(x, Mul(delta, constant mix))" in LERP.requires(_matmul_relu())


def test_lerp_refuses_an_old_opset():
    model = _matmul_relu(opset=11)
    assert "opset >= 13" in LERP.requires(model)


def test_lora_refuses_without_a_sibling_or_a_stack():
    # the base graph has no stacked lerps, so batch-only finds nothing
    reason = FuseLora(LoraConfig(concat_siblings=False)).requires(base())
    assert reason and "stacked tensor" in reason
    assert "no LoRA down-projection" in LORA.requires(_matmul_relu())
    assert "both" in FuseLora(LoraConfig(concat_siblings=False, batch_stacked=False)).requires(base())


def test_lerp_config_takes_plain_strings():
    assert LerpConfig(unstack="split").unstack is Unstack.SPLIT
    with pytest.raises(ValueError):
        LerpConfig(min_group=1)


def test_both_rules_are_off_by_default():
    # neither measured faster on the 0.1B shape on ORT CPU (benchmarks/fusion_speed.py)
    assert FuseLora.enabled_by_default is False
    assert FuseTokenShiftLerp.enabled_by_default is False


def _matmul_relu(opset: int = 21) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2])
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g", [x], [y], [w]
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_core_does_not_import_graphsurgeon():
    """The runtime, the CLI and every core pass load without onnx-graphsurgeon (the experimental extra)."""
    import subprocess
    import sys

    code = (
        "import sys; import rwkv_opt.cli, rwkv_opt.runtime.generate; from rwkv_opt.passes.base import load_builtin; "
        "load_builtin(); print(sorted(m for m in sys.modules if 'graphsurgeon' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
