"""quantize pass: op types, exclusions, numerics vs the fp32 graph, refusals, calibration, targets."""

from __future__ import annotations

import fnmatch
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rwkv_testutil import ort_session, zero_feed
from rwkv_opt.bench.metrics import compare_logits
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph.model import BuildOptions, LogitsMode, build_model
from rwkv_opt.passes import PassRefused
from rwkv_opt.passes import _quant_core as qc
from rwkv_opt.passes._quant_calib import text_tokens
from rwkv_opt.passes.base import get_meta
from rwkv_opt.passes.quantize import DEFAULT_EXCLUDE, Quantize, QuantizeConfig

BIG = ("*/att/MatMul", "*/att/MatMul_?", "*/ffn/MatMul", "*/ffn/MatMul_1", "/head/MatMul")  # 6 per layer + head
FLOAT_SCOPES = ("/att/decay/", "/att/a/", "/att/gate/", "/att/v_mix/", "/wkv/", "/deepembed/MatMul")


@pytest.fixture(scope="module")
def base(tiny_weights):
    return build_model(tiny_weights, BuildOptions(logits=LogitsMode.ALL))


@pytest.fixture(scope="module")
def base7(tiny7):
    return build_model(tiny7, BuildOptions(logits=LogitsMode.ALL))


def _big(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in BIG)


def _quantize(model, **kw) -> onnx.ModelProto:
    out = Quantize(QuantizeConfig(**kw))(model).model
    onnx.checker.check_model(out, full_check=True)
    return out


def _logits(model, cfg, tokens, optimize=False):
    feed = zero_feed(cfg, tokens.shape[0])
    feed["x"] = tokens
    return ort_session(model, optimize=optimize).run(["head"], feed)[0]


@pytest.mark.parametrize(
    "scheme,op,bits",
    [("int8", "DynamicQuantizeMatMul", None), ("nbits8", "MatMulNBits", 8), ("nbits4", "MatMulNBits", 4)],
)
def test_op_types(base, scheme, op, bits):
    out = _quantize(base, scheme=scheme)
    before = {n.name: n.op_type for n in base.graph.node}
    after = {n.name: n for n in out.graph.node}
    assert set(before) == set(after), "node names are kept"
    big = [n for n in before if before[n] == "MatMul" and _big(n)]
    assert len(big) == 6 * int(get_meta(base, "rwkv_opt.n_layer")) + 1
    for name in big:
        assert after[name].op_type == op, name
        if bits:
            assert {a.name: a.i for a in after[name].attribute}["bits"] == bits
            assert {a.name: a.i for a in after[name].attribute}["accuracy_level"] == 4
    assert any(o.domain == qc.MS_DOMAIN for o in out.opset_import)
    assert json.loads(get_meta(out, "rwkv_opt.quantization"))["matmuls"] == {scheme: len(big)}


def test_exclusions_stay_float(base):
    out = _quantize(base, scheme="nbits4", embedding="nbits4")
    inits_before = {t.name: t for t in base.graph.initializer}
    inits_after = {t.name: t for t in out.graph.initializer}
    nodes_before = {n.name: n for n in base.graph.node}
    kept = 0
    for n in out.graph.node:
        if any(s in n.name for s in FLOAT_SCOPES):
            assert n == nodes_before[n.name], f"{n.name} changed"  # Scan bodies included
            for i in n.input:
                if i in inits_before:
                    assert inits_after[i] == inits_before[i], f"{i} changed"
            kept += n.op_type == "MatMul"
    assert kept >= 8 * int(get_meta(base, "rwkv_opt.n_layer")) - 2  # 4 LoRA pairs (layer 0: no v_mix)
    assert not [n.name for n in out.graph.node if n.op_type == "MatMul" and _big(n.name)]


def test_overrides_and_embedding(base):
    rules = (("/head/*", "nbits8"), ("*/ffn/*", "int8"), ("/emb", "nbits4", 64))
    out = _quantize(base, scheme="nbits4", overrides=rules, embedding="nbits8")
    ops = {n.name: n for n in out.graph.node}
    bits = lambda n: {a.name: a.i for a in n.attribute}["bits"]  # noqa: E731
    assert ops["/head/MatMul"].op_type == "MatMulNBits" and bits(ops["/head/MatMul"]) == 8
    assert ops["/blocks.1/ffn/MatMul_1"].op_type == "DynamicQuantizeMatMul"
    assert bits(ops["/blocks.1/att/MatMul_3"]) == 4
    assert ops["/emb"].op_type == "GatherBlockQuantized" and bits(ops["/emb"]) == 4
    assert {a.name: a.i for a in ops["/emb"].attribute}["block_size"] == 64
    for n in out.graph.node:  # DeepEmbed tables take `embedding`
        if n.name.endswith("/deepembed/Gather"):
            assert n.op_type == "GatherBlockQuantized" and bits(n) == 8
    assert "emb.weight.ln0" not in {t.name for t in out.graph.initializer}


def test_exact_against_dequantized_weights(base, tiny_weights):
    """accuracy_level 0 (float activations): the graph computes x @ dequant(W) to float rounding."""
    out = _quantize(base, scheme="nbits4", accuracy_level=0, block_size=32, embedding="nbits8")
    quantized = {n.name: n.op_type for n in out.graph.node}
    swapped = onnx.ModelProto()
    swapped.CopyFrom(base)
    inits = {t.name: t for t in swapped.graph.initializer}
    tables = 0
    for n in base.graph.node:
        if quantized[n.name] == "MatMulNBits":
            w = numpy_helper.to_array(inits[n.input[1]])
            deq = qc.rtn(w, 4, 32, False).dequantize()
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(deq, n.input[1]))
        elif quantized[n.name] == "GatherBlockQuantized":  # emb, and DeepEmbed's s_emb tables
            w = numpy_helper.to_array(inits[n.input[0]])
            deq = np.ascontiguousarray(qc.rtn(w.T, 8, 32, False).dequantize().T)
            inits[n.input[0]].CopyFrom(numpy_helper.from_array(deq, n.input[0]))
            tables += 1
    assert tables == 1 + (tiny_weights.config.n_layer if tiny_weights.config.deepembed else 0)
    tokens = np.random.default_rng(0).integers(0, tiny_weights.config.vocab, (2, 24))
    want = _logits(swapped, tiny_weights.config, tokens)
    got = _logits(out, tiny_weights.config, tokens)
    assert np.abs(got - want).max() / want.std() < 1e-4


@pytest.mark.parametrize("target", ["cpu-int8", "cpu-int4"])
def test_agreement_with_fp32(base7, tiny7, target):
    """The target's quantize config vs the fp32 graph, 2 x 48 positions, our graph (ORT optimizations off)."""
    from rwkv_opt.targets import get_target

    t = get_target(target)
    out = _quantize(base7, **dict(t.passes)["quantize"])
    tokens = np.random.default_rng(1).integers(0, tiny7.config.vocab, (2, 48))
    m = compare_logits(_logits(base7, tiny7.config, tokens), _logits(out, tiny7.config, tokens))
    # KL is the budget figure these 96 positions measure well; top-1 on the flat logits of a synthetic
    # model is coarse (reports/quantization.md), so it is held to a floor below the budget here.
    assert m["mean_kl"] <= t.budget.max_kl, m
    assert m["max_rel_err"] <= t.budget.max_rel_err, m
    assert m["top1"] >= (0.9 if target == "cpu-int8" else 0.7), m


def test_refusals(base):
    with pytest.raises(PassRefused, match="accuracy_level=4"):
        Quantize(QuantizeConfig(scheme="nbits8", accuracy_level=0))(base)
    with pytest.raises(PassRefused, match="accuracy_level=4"):
        Quantize(QuantizeConfig(scheme="nbits4", accuracy_level=0, overrides=(("/head/*", "nbits8"),)))(base)
    with pytest.raises(PassRefused, match="power of 2"):
        Quantize(QuantizeConfig(block_size=48))(base)
    with pytest.raises(PassRefused, match="embedding"):
        Quantize(QuantizeConfig(embedding="int8"))(base)
    once = Quantize(QuantizeConfig(scheme="nbits4"))(base).model
    with pytest.raises(PassRefused, match="already quantized"):
        Quantize(QuantizeConfig(scheme="nbits4"))(once)
    with pytest.raises(RwkvOptError, match="schemes: float, int8"):
        QuantizeConfig(scheme="int3")


def test_refuses_int8_dynamic_on_fp16(base):
    from rwkv_opt.passes.fp16_mixed import Fp16Mixed

    half = Fp16Mixed()(base).model
    with pytest.raises(PassRefused, match="float32 kernels only"):
        Quantize(QuantizeConfig(scheme="int8"))(half)
    out = _quantize(half, scheme="nbits4")
    scales = [t for t in out.graph.initializer if t.name.endswith(".scales")]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)


def test_shared_weight_quantized_per_node(base7):
    shared = onnx.ModelProto()
    shared.CopyFrom(base7)
    nodes = {n.name: n for n in shared.graph.node}
    nodes["/blocks.0/att/MatMul_1"].input[1] = nodes["/blocks.0/att/MatMul"].input[1]  # k reads r's weight
    out = _quantize(shared, scheme="nbits4", overrides=(("/blocks.0/att/MatMul_1", "nbits8"),))
    ins = {n.name: list(n.input) for n in out.graph.node}
    assert ins["/blocks.0/att/MatMul"][1] != ins["/blocks.0/att/MatMul_1"][1]


def test_no_match_is_no_change(base):
    res = Quantize(QuantizeConfig(include=("/nothing/*",)))(base)
    assert not res.changed and res.model is base


def test_gptq_calibrated_from_the_model(base, tiny_weights):
    res = Quantize(QuantizeConfig(scheme="nbits4", algorithm="gptq", calibration_sequences=4, calibration_length=32))(
        base
    )
    onnx.checker.check_model(res.model, full_check=True)
    assert any("gptq calibration: 4 x 32 tokens (sequences sampled from the model)" in n for n in res.notes)
    assert sum(n.op_type == "MatMulNBits" for n in res.model.graph.node) == 6 * tiny_weights.config.n_layer + 1


def test_gptq_beats_rtn_on_held_out_inputs():
    """On correlated inputs GPTQ's output error on unseen rows is below round-to-nearest's."""
    rng = np.random.default_rng(0)
    K, N = 256, 192
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    mix = (rng.standard_normal((K, K)) * np.exp(-np.arange(K) / 64)[:, None]).astype(np.float32)  # decaying spectrum
    x_fit, x_new = (rng.standard_normal((n, K)).astype(np.float32) @ mix for n in (2048, 512))
    H = x_fit.T @ x_fit
    err = lambda wq: np.linalg.norm(x_new @ (wq - w)) / np.linalg.norm(x_new @ w)  # noqa: E731
    e_rtn = err(qc.rtn(w, 4, 32, False).dequantize())
    e_gptq = err(qc.gptq(w, H, 4, 32, False).dequantize())
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


def test_calibration_text(tmp_path):
    from rwkv_opt.reference.tokenizer import load_world_tokenizer

    text = "The quick brown fox jumps over the lazy dog. " * 40
    p = tmp_path / "calib.txt"
    p.write_text(text, encoding="utf-8")
    toks = text_tokens(str(p), 3, 16, 65536)
    assert toks.shape == (3, 16)
    assert toks.reshape(-1).tolist() == load_world_tokenizer().encode(text)[:48]
    with pytest.raises(RwkvOptError, match="vocabulary has 1024 rows"):
        text_tokens(str(p), 3, 16, 1024)
    with pytest.raises(RwkvOptError, match="does not exist"):
        text_tokens(str(tmp_path / "missing.txt"), 3, 16, 65536)


def test_default_exclusions_cover_the_fragile_scopes():
    cfg = QuantizeConfig()
    for name in (
        "/blocks.0/att/decay/MatMul",
        "/blocks.3/att/wkv/fused/If",
        "/blocks.1/att/a/MatMul_1",
        "/blocks.1/att/gate/MatMul",
        "/blocks.2/att/v_mix/MatMul",
        "/blocks.0/ffn/deepembed/MatMul",
    ):
        assert cfg.resolve(name)[0].value == "float", name
    for name in ("/blocks.0/att/MatMul", "/blocks.11/ffn/MatMul_1", "/head/MatMul"):
        assert cfg.resolve(name) == ("nbits4", 128), name
    assert "*/att/decay/*" in DEFAULT_EXCLUDE


@pytest.mark.parametrize("target", ["cpu-int8", "cpu-int4"])
def test_cpu_targets_quantize_the_loras_to_int8(base7, tiny7, target):
    """cpu-int8 and cpu-int4: every time-mix LoRA MatMul (decay, a, gate, v_mix; down and up) is a
    DynamicQuantizeMatMul over per-column int8 weights; cpu-int4's big projections stay 4-bit MatMulNBits
    (the FFN is int8 too), the WKV stays float; the LoRA weights a decode step reads shrink (fp32 -> int8 codes
    + one fp32 scale per column: ~3.8x at 0.1B, less for tiny's small ranks)."""
    from rwkv_opt.targets import get_target

    cfg = {**dict(get_target(target).passes)["quantize"], "algorithm": "rtn"}
    out = _quantize(base7, **cfg)
    lora = [n for n in out.graph.node if any(s in n.name for s in FLOAT_SCOPES[:4]) and "MatMul" in n.op_type]
    assert len(lora) == 8 * tiny7.config.n_layer - 2
    assert {n.op_type for n in lora} == {"DynamicQuantizeMatMul"}
    ops = {n.name: n for n in out.graph.node}
    assert ops["/blocks.1/ffn/MatMul"].op_type == "DynamicQuantizeMatMul"
    if target == "cpu-int4":
        bits = {
            n.name: {a.name: a.i for a in n.attribute}["bits"] for n in out.graph.node if n.op_type == "MatMulNBits"
        }
        assert bits["/blocks.1/att/MatMul"] == 4 and bits["/head/MatMul"] == 4
        assert ops["/blocks.1/ffn/MatMul_1"].op_type == "DynamicQuantizeMatMul"
    assert not any("/wkv/" in n.name for n in out.graph.node if "MatMul" in n.op_type and n.op_type != "MatMul")
    sizes = {t.name: t for t in out.graph.initializer}
    before = {t.name: t for t in base7.graph.initializer}
    fp32 = sum(
        4 * int(np.prod(before[i].dims))
        for n in base7.graph.node
        for i in n.input[1:2]
        if n.name in {m.name for m in lora}
    )
    q = sum(len(sizes[i].raw_data) for n in lora for i in n.input[1:])
    assert 2.5 < fp32 / q < 4.0, (fp32, q)


@pytest.mark.parametrize("target", ["cpu-int8", "cpu-int4", "cuda-int4"])
def test_pipeline_artifacts(tiny7, tmp_path, target):
    """Tiny artifacts through run_pipeline with the target's passes, verified on 16 + 32 tokens against
    its KL and max-error budgets. Top-1 is asked at a 60% rate only: the untrained tiny model's logits
    are flat (193 teacher-forced positions: cpu-int8 97.9%, cpu-int4 82.9%, cuda-int4 83.4%), so the
    real budgets' binomial gate passes cpu-int8 (32/33) and refuses the 4-bit targets (25/33, 24/33),
    and one flip can differ between CPUs' integer kernels; the goals are measured in
    benchmarks/quant_speed.py and reports/quantization.md (where a trained 0.1B meets them)."""
    import dataclasses

    from rwkv_opt.pipeline import run_pipeline
    from rwkv_opt.runtime import Session
    from rwkv_opt.targets import get_target

    t = get_target(target)
    t = dataclasses.replace(t, budget=dataclasses.replace(t.budget, min_top1=0.6))
    man = run_pipeline(t, tiny7, tmp_path / target, progress=lambda s: None)
    v = man["verification"]
    assert v["within_budget"] and v["mean_kl"] <= get_target(target).budget.max_kl, v
    assert man["quantization"] == t.quantization
    q = [p for p in man["passes"] if p["name"] == "quantize"][0]
    # the cpu targets also quantize the LoRAs: down + up of decay, a, gate and v_mix (which block 0 has not)
    loras = 8 * tiny7.config.n_layer - 2 if target.startswith("cpu-") else 0
    assert (
        q["changed"]
        and q["ops_after"].get("MatMulNBits", 0) + q["ops_after"].get("DynamicQuantizeMatMul", 0)
        == 6 * tiny7.config.n_layer + 1 + loras
    )
    logits, _ = Session(tmp_path / target).forward(np.arange(5)[None])
    assert np.isfinite(logits).all()


def test_targets_listed(capsys):
    from rwkv_opt.cli import main

    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("cpu-int8", "cpu-int4", "cuda-int4"):
        assert name in out
