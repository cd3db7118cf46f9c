"""The staged pipeline per target: artifacts, manifests, verification and budget gating."""

import dataclasses
import json

import pytest

from rwkv_opt.errors import RwkvOptError
from rwkv_opt.inspect import info
from rwkv_opt.passes.base import load_builtin
from rwkv_opt.pipeline import run_pipeline
from rwkv_opt.targets import TARGETS, Budget, get_target

quiet = dict(progress=lambda _m: None)


def test_every_target_pass_is_registered():
    for t in TARGETS.values():
        for name, overrides in t.passes:
            assert name in load_builtin(), f"{t.name} lists unknown pass {name}"
            load_builtin()[name].configure(overrides)  # the overrides fit the pass's typed config


@pytest.mark.parametrize("target", ["cuda-fp16", "cuda-bf16"])
def test_cuda_targets_build_and_verify_on_cpu(tiny7, tmp_path, target):
    out = tmp_path / target
    man = run_pipeline(get_target(target), tiny7, out, **quiet)
    d = info(out)
    for io in d["inputs"] + d["outputs"]:
        if io["name"].startswith(("wkv_state", "wkv_next")) or io["name"] == "head":
            assert io["dtype"] == "float32", io
    v = man["verification"]
    assert v["within_budget"] and v["top1"] >= 0.99, v
    assert v["status"] == "passed" and v["protocol"].startswith(f"{v['positions']} teacher-forced positions")
    if target == "cuda-bf16":  # the verification says why it checks 9 positions, not 33
        assert v["positions"] == 9 and "8 + 8 tokens: ORT's CPU EP has no bf16 kernels" in v["protocol"], v
    assert [p["name"] for p in man["passes"]] == get_target(target).pass_names
    assert (
        json.loads(d["metadata"]["rwkv_opt.precision"])["weights"] == {"cuda-fp16": "fp16", "cuda-bf16": "bf16"}[target]
    )


def test_manifest_records_each_pass(tiny7, tmp_path):
    man = run_pipeline(get_target("cpu-fp32"), tiny7, tmp_path / "a", **quiet)
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert on_disk["target"] == "cpu-fp32" and on_disk["source"]["config"]["n_layer"] == 2
    for rec in on_disk["passes"]:
        assert rec["seconds"] >= 0 and rec["nodes_after"] == sum(rec["ops_after"].values())
        assert isinstance(rec["changed"], bool) and "config" in rec
    wkv = next(p for p in on_disk["passes"] if p["name"] == "fuse_wkv")
    assert wkv["changed"] and wkv["ops_after"].get("If", 0) > wkv["ops_before"].get("If", 0)
    assert set(on_disk["versions"]) >= {"onnx", "onnxruntime", "numpy", "rwkv_opt"}
    assert man["total_seconds"] > 0


def test_missed_budget_writes_nothing(tiny7, tmp_path):
    strict = dataclasses.replace(get_target("cuda-fp16"), budget=Budget(min_top1=1.0, max_rel_err=1e-7, max_kl=0))
    with pytest.raises(RwkvOptError, match="missed its accuracy budget"):
        run_pipeline(strict, tiny7, tmp_path / "out", **quiet)
    assert list(tmp_path.iterdir()) == []


def test_top1_gate_is_a_binomial_test():
    """min_top1 is a rate: a sample fails only when it is evidence (p < 5%) that the rate is lower."""
    b = Budget(min_top1=0.98, max_rel_err=0.5, max_kl=0.02)
    assert b.top1_p_value(9, 9) == 1.0
    assert b.top1_p_value(8, 9) == pytest.approx(1 - 0.98**9)  # 0.166: one flip in 9
    assert b.top1_p_value(7, 9) == pytest.approx(1 - 0.98**9 - 9 * 0.02 * 0.98**8)  # 0.013
    assert b.failures(8 / 9, 9, 0.1, 1e-3) == []
    assert [m.split(" (")[0] for m in b.failures(7 / 9, 9, 0.1, 1e-3)] == ["top-1 7/9"]
    assert b.failures(29 / 33, 33, 0.1, 1e-3)  # the synthetic 0.1B's cpu-int8
    assert b.failures(32 / 33, 33, 0.1, 1e-3) == []
    misses = b.failures(1.0, 33, 0.6, 0.03)
    assert len(misses) == 2 and misses[0].startswith("max|err|/std 6.00e-01") and misses[1].startswith("mean KL")
    exact = Budget(min_top1=1.0, max_rel_err=1e-4, max_kl=1e-8)  # fp32: any flip fails
    assert exact.failures(32 / 33, 33, 0, 0) and not exact.failures(1.0, 33, 0, 0)


def test_pass_order_is_checked(tiny7, tmp_path):
    """Order rules are preconditions on what earlier passes recorded: quantizing twice is refused, and
    a precision pass after quantize is refused (the model is no longer fp32), with nothing written."""
    for passes, why in [
        ((("quantize", {}), ("quantize", {})), "already quantized"),
        ((("quantize", {}), ("fp16_mixed", {})), "fp32 models only"),
    ]:
        t = dataclasses.replace(get_target("cpu-fp32"), passes=passes)
        with pytest.raises(RwkvOptError, match=why):
            run_pipeline(t, tiny7, tmp_path / "out", **quiet)
    assert list(tmp_path.iterdir()) == []


def test_unknown_pass_option_is_one_sentence(tiny7, tmp_path):
    t = dataclasses.replace(get_target("cpu-fp32"), passes=(("fuse_wkv", {"chunkk": 64}),))
    with pytest.raises(RwkvOptError, match="pass 'fuse_wkv' has no option 'chunkk'; its options are: chunk, "):
        run_pipeline(t, tiny7, tmp_path / "out", **quiet)
    assert list(tmp_path.iterdir()) == []


def test_verification_tokens_are_the_models_own(tiny7):
    """pipeline verifies on a sequence the fp32 reference samples itself: reproducible, and far more
    probable under the model than the random tokens it replaced."""
    import numpy as np

    from rwkv_opt.bench.accuracy import fixed_tokens, model_tokens
    from rwkv_opt.bench.metrics import log_softmax
    from rwkv_opt.reference import ReferenceModel

    ref = ReferenceModel(tiny7, np.float32)
    toks = model_tokens(ref, 48, seed=0)
    assert toks.shape == (1, 48) and toks.dtype == np.int64 and 0 <= toks.min() and toks.max() < tiny7.config.vocab
    assert np.array_equal(toks, model_tokens(ref, 48, seed=0)) and not np.array_equal(
        toks, model_tokens(ref, 48, seed=1)
    )

    def mean_logprob(t):
        logits, _ = ref.forward(t)
        lp = log_softmax(np.asarray(logits[0, :-1], np.float64))
        return lp[np.arange(t.shape[1] - 1), t[0, 1:]].mean()

    rand = fixed_tokens(tiny7.config.vocab, 1, 48, seed=0)
    assert mean_logprob(toks) > mean_logprob(rand) + 1.0, (mean_logprob(toks), mean_logprob(rand))


def test_quant_algorithm_choice():
    from rwkv_opt.pipeline import GPTQ_AUTO_MAX_PARAMS, choose_quant_algorithm

    int4 = get_target("cpu-int4")
    assert dict(int4.passes)["quantize"]["algorithm"] == "gptq"
    small, rec = choose_quant_algorithm(int4, 10**8)
    assert dict(small.passes)["quantize"]["algorithm"] == "gptq" and rec["chosen"] == "gptq"
    big, rec = choose_quant_algorithm(int4, GPTQ_AUTO_MAX_PARAMS + 1)
    assert dict(big.passes)["quantize"]["algorithm"] == "rtn" and "RTN" in rec["why"]
    forced, rec = choose_quant_algorithm(int4, GPTQ_AUTO_MAX_PARAMS + 1, "gptq")
    assert dict(forced.passes)["quantize"]["algorithm"] == "gptq"
    assert choose_quant_algorithm(get_target("cpu-fp32"), 10**10) == (get_target("cpu-fp32"), None)
    cuda, rec = choose_quant_algorithm(get_target("cuda-int4"), 10**9)  # fp16: calibration costs 1.5x fp32
    assert dict(cuda.passes)["quantize"]["algorithm"] == "rtn" and "1.5x fp32" in rec["why"]
    assert dict(choose_quant_algorithm(get_target("cuda-int4"), 10**8)[0].passes)["quantize"]["algorithm"] == "gptq"
    with pytest.raises(RwkvOptError, match="choose auto, gptq or rtn"):
        choose_quant_algorithm(int4, 10**8, "awq")


def test_refuses_up_front_when_verification_cannot_fit(tiny7, tmp_path, monkeypatch):
    import rwkv_opt.pipeline as pl

    target = get_target("cpu-fp32")
    plan = pl.memory_plan(tiny7.config, target, pl.estimated_artifact_bytes(tiny7.config, target))
    assert plan["passes"] < plan["verify_session"]
    monkeypatch.setattr(pl, "available_memory", lambda: (plan["passes"] + plan["verify_session"]) // 2)
    monkeypatch.setattr(pl, "verify_blocks", lambda *_a: 0)  # not even one block (the estimate: next test)
    with pytest.raises(RwkvOptError, match="pass --no-verify to write it unverified"):
        run_pipeline(get_target("cpu-fp32"), tiny7, tmp_path / "a", **quiet)
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())  # nothing started
    man = run_pipeline(get_target("cpu-fp32"), tiny7, tmp_path / "a", do_verify=False, **quiet)
    assert (
        "--no-verify" in man["verification"]["skipped"]
        and "more than this machine has" in man["verification"]["skipped"]
    )
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert on_disk["verification"] == man["verification"]
    assert set(on_disk["phase_seconds"]) == {"build", "passes", "write"} and on_disk["peak_rss_bytes"] > 0
    assert on_disk["artifact_bytes"] > 0


def test_verifies_a_prefix_when_the_whole_model_cannot_fit(tiny_weights, tmp_path, monkeypatch):
    """Blocks 0..k-1 + head, against the reference cut the same way; the manifest says how far."""
    import rwkv_opt.pipeline as pl

    target, cfg = get_target("cpu-fp32"), tiny_weights.config
    plan = pl.memory_plan(cfg, target, pl.estimated_artifact_bytes(cfg, target))
    lo, hi = 0, plan["verify_session"]
    while hi - lo > 1:  # the least memory that still holds one block
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if pl.verify_blocks(cfg, target, plan, mid) >= 1 else (mid, hi)
    monkeypatch.setattr(pl, "available_memory", lambda: hi)
    assert pl.verify_blocks(cfg, target, plan, hi) == 1 < cfg.n_layer
    man = run_pipeline(target, tiny_weights, tmp_path / "a", **quiet)
    v = man["verification"]
    assert v["blocks_verified"] == 1 and "blocks 0-0 of 2" in v["scope"] and v["within_budget"], v
    assert v["max_rel_err"] < 1e-4 and v["positions"] == 33
    assert not list((tmp_path / "a").glob(".verify-*"))  # the truncated model does not stay
    monkeypatch.setattr(pl, "available_memory", lambda: hi - 1)
    with pytest.raises(RwkvOptError, match="not even its embedding, first block and head fit"):
        run_pipeline(target, tiny_weights, tmp_path / "b", **quiet)


def test_truncated_model_matches_the_truncated_reference(tiny_weights, tmp_path):
    """graph/truncate cuts the same network the reference runs with its first k layers."""
    import dataclasses

    import numpy as np
    import onnx

    from rwkv_opt.graph.model import BuildOptions, LogitsMode, build_model
    from rwkv_opt.graph.truncate import truncate
    from rwkv_opt.reference import ReferenceModel
    from rwkv_opt.runtime import Session

    m = truncate(build_model(tiny_weights, BuildOptions(logits=LogitsMode.ALL)), 1)
    onnx.checker.check_model(m, full_check=True)
    assert not any(i.name.endswith("_1") for i in m.graph.input)
    onnx.save_model(m, str(tmp_path / "m.onnx"))
    toks = np.random.default_rng(0).integers(0, tiny_weights.config.vocab, (2, 12))
    got, _ = Session(tmp_path / "m.onnx").forward(toks)
    ref = ReferenceModel(tiny_weights, np.float32)
    ref.cfg, ref.layers.n = dataclasses.replace(ref.cfg, n_layer=1), 1
    want, _ = ref.forward(toks)
    full, _ = ReferenceModel(tiny_weights, np.float32).forward(toks)
    assert np.abs(got - want).max() / want.std() < 1e-5
    assert np.abs(got - full).max() / full.std() > 1e-2  # really a different (shorter) network
