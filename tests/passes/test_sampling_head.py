"""The sampling head against the numpy reference sampler (itself pinned to the official package).

Distribution: for fixed logits and several parameter sets, 20,000 draws from the ONNX head
(one batch of 20,000 rows, fed uniforms) against the reference's exact probabilities (chi-square,
p > 0.001), plus draw-for-draw equality with the reference given the same uniforms. Exactness:
penalized logits and occurence_next bit-identical to the reference; greedy == argmax.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from rwkv_opt.graph.model import BuildOptions, LogitsMode, build_model
from rwkv_opt.passes.base import PassRefused, get_meta
from rwkv_opt.passes.sampling_head import Config, SamplingHead, occurrence_from_onnx, occurrence_to_onnx, sampling_feeds
from rwkv_opt.reference.sampler import (
    OFFICIAL_PIPELINE_ARGS,
    Occurrence,
    SamplingParams,
    apply_penalties,
    occurrence_exempt_mask,
    sample,
    sampling_probs,
    update_occurrence,
)
from rwkv_testutil import zero_feed

ort.set_default_logger_severity(3)  # the overridable defaults log one warning each at load
PENALIZED = "/sampling/penalties/ScatterND/output_0"  # internal value, exposed by the tests only


def stub(V: int, dtype=TensorProto.FLOAT, opset: int = 21, vocab_meta: bool = True) -> onnx.ModelProto:
    """logits -> Identity -> head: a model whose logits are whatever the test feeds."""
    g = helper.make_graph(
        [helper.make_node("Identity", ["logits"], ["head"])],
        "stub",
        [helper.make_tensor_value_info("logits", dtype, ["batch", "seq", V])],
        [helper.make_tensor_value_info("head", dtype, ["batch", "seq", V])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    if vocab_meta:
        m.metadata_props.add(key="rwkv_opt.vocab", value=str(V))
    return m


def session(model: onnx.ModelProto, extra_outputs=()) -> ort.InferenceSession:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in extra_outputs:
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


_HEADS: dict = {}


def head_session(V: int, dtype=TensorProto.FLOAT, **cfg) -> ort.InferenceSession:
    key = (V, dtype, tuple(sorted(cfg.items())))
    if key not in _HEADS:
        _HEADS[key] = session(SamplingHead(Config(**cfg))(stub(V, dtype)).model, [PENALIZED])
    return _HEADS[key]


def run(sess, logits_BV, params=None, occurence=None, uniform=None, outputs=("y", "occurence_next")):
    feed = {"logits": np.ascontiguousarray(logits_BV[:, None, :])}
    if params is not None:
        feed.update(sampling_feeds(params))
    if occurence is not None:
        feed["occurence"] = occurence
    if uniform is not None:
        feed["uniform"] = uniform
    return dict(zip(outputs, sess.run(list(outputs), feed)))


def all_ops(graph: onnx.GraphProto) -> set[str]:
    """Op types of a graph and of its If branches."""
    ops = set()
    for n in graph.node:
        ops.add(n.op_type)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                ops |= all_ops(a.g)
    return ops


def chi2_sf(x: float, dof: int) -> float:
    """P(chi2_dof >= x): the regularized upper incomplete gamma Q(dof/2, x/2) (no scipy needed)."""
    a, x = dof / 2.0, x / 2.0
    if x <= 0:
        return 1.0
    log_pre = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:  # series for P
        term = total = 1.0 / a
        n = a
        while abs(term) > abs(total) * 1e-15:
            n += 1
            term *= x / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_pre))
    b, c, d = x + 1 - a, 1e300, 1.0 / (x + 1 - a)  # continued fraction for Q (modified Lentz)
    h = d
    for i in range(1, 100000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = b + an / c
        c = c if abs(c) > 1e-300 else 1e-300
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_pre) * h


def chi_square_p(draws: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of integer draws to probs; categories with expected < 5 are pooled."""
    assert np.all(probs[draws] > 0), "drew a token the reference gives probability 0"
    n = draws.size
    observed = np.bincount(draws, minlength=probs.size).astype(np.float64)
    order = np.argsort(probs)  # pool the rarest categories together
    exp_sorted, obs_sorted = probs[order] * n, observed[order]
    keep = exp_sorted >= 5
    cats_e = list(exp_sorted[keep]) + ([exp_sorted[~keep].sum()] if (~keep).any() else [])
    cats_o = list(obs_sorted[keep]) + ([obs_sorted[~keep].sum()] if (~keep).any() else [])
    e, o = np.array(cats_e), np.array(cats_o)
    if e[-1] < 5 and len(e) > 1:  # a too-small pooled bucket joins its neighbour
        e[-2] += e[-1]
        o[-2] += o[-1]
        e, o = e[:-1], o[:-1]
    if len(e) < 2:
        return 1.0
    return chi2_sf(float(np.sum((o - e) ** 2 / e)), len(e) - 1)


def test_chi2_sf_known_values():
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, abs=1e-9)
    assert chi2_sf(18.307038053275146, 10) == pytest.approx(0.05, abs=1e-9)
    assert chi2_sf(124.34211340400407, 100) == pytest.approx(0.05, abs=1e-9)
    assert chi2_sf(1e4, 3) < 1e-100


@pytest.fixture(scope="module")
def exempt_1024():
    return occurrence_exempt_mask(size=1024)


@pytest.fixture(scope="module")
def exempt_65536():
    return occurrence_exempt_mask()


def history(
    V: int, exempt: np.ndarray, params: SamplingParams, steps: int, seed: int, favour: np.ndarray
) -> Occurrence:
    """An occurrence after `steps` generated tokens drawn from `favour` and the exempt tokens."""
    rng = np.random.default_rng(seed)
    pool = np.concatenate([favour, np.flatnonzero(exempt)[:6]])
    occ = Occurrence.zeros(V)
    for t in rng.choice(pool, steps):
        update_occurrence(occ, int(t), params, exempt)
    return occ


def as_float32_counts(occ: Occurrence, exempt: np.ndarray) -> Occurrence:
    """The reference state the head sees: counts rounded to float32, as carried between steps."""
    return occurrence_from_onnx(occurrence_to_onnx(occ, exempt), exempt)


CHI2_PARAMS = {
    "g1_defaults": SamplingParams(),
    "official": OFFICIAL_PIPELINE_ARGS,
    "hot_top_k": SamplingParams(temperature=1.5, top_p=0.95, top_k=40),
    "cold_no_top_p": SamplingParams(temperature=0.6, top_p=1.0, alpha_presence=0.5),
    "bans_top_k_ties": SamplingParams(top_p=0.8, top_k=3, token_ban=(5, 7, 900)),
}


@pytest.mark.parametrize("name", CHI2_PARAMS)
def test_distribution_matches_reference(name, exempt_1024):
    """20,000 draws at V = 1024 vs the reference's exact probabilities, and draw for draw."""
    V, N, params = 1024, 20_000, CHI2_PARAMS[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    logits = (rng.standard_normal(V) * 2.0).astype(np.float32)
    ties = [40, 41, 42, 43]
    if name == "bans_top_k_ties":
        logits[ties] = logits.max() + 0.5  # a tie across the top-k boundary: lower ids win
    favour = np.setdiff1d(np.argsort(logits)[-16:], ties)
    occ = as_float32_counts(history(V, exempt_1024, params, 30, 1, favour), exempt_1024)
    probs = sampling_probs(apply_penalties(logits, occ, params), params).astype(np.float64)
    if name == "bans_top_k_ties":
        assert np.flatnonzero(probs).tolist() == ties[:3]
    u = rng.random(N)
    got = run(head_session(V), np.broadcast_to(logits, (N, V)), params, occurrence_to_onnx(occ, exempt_1024)[None], u)[
        "y"
    ]
    p = chi_square_p(got, probs / probs.sum())
    assert p > 1e-3, f"{name}: chi-square p = {p:.2e}"
    cdf = np.cumsum(probs)
    want = np.searchsorted(cdf / cdf[-1], u, side="right")  # what sample() does, for every u at once
    assert np.array_equal(
        want[:50], sample(np.broadcast_to(apply_penalties(logits, occ, params), (50, V)), params, u[:50])
    )
    assert np.mean(got == want) >= 0.999, f"{name}: {np.sum(got != want)} draws differ from the reference"
    print(
        f"{name}: chi-square p = {p:.3f}, support {int((probs > 0).sum())}, "
        f"{int(np.sum(got == want))}/{N} draws equal to the reference"
    )


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        OFFICIAL_PIPELINE_ARGS,
        SamplingParams(temperature=0.8, top_p=1.0),
        SamplingParams(temperature=1.2, top_p=0.3, top_k=100),
    ],
    ids=["g1", "official", "top_p_1", "top_k"],
)
def test_full_vocab_draws_match_reference(params, exempt_65536):
    """V = 65536 (RWKV-7 World): draw for draw, and top_p = 1 does not degenerate to greedy."""
    V, N = 65536, 24
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(V) * 2.5).astype(np.float32)
    occ = as_float32_counts(history(V, exempt_65536, params, 40, 2, np.argsort(logits)[-30:]), exempt_65536)
    u = rng.random(N)
    got = run(head_session(V), np.broadcast_to(logits, (N, V)), params, occurrence_to_onnx(occ, exempt_65536)[None], u)[
        "y"
    ]
    want = sample(np.broadcast_to(apply_penalties(logits, occ, params), (N, V)), params, u)
    np.testing.assert_array_equal(got, want)
    if params.top_p >= 1:
        assert len(set(got.tolist())) > N // 2  # upstream's fp32 cumsum would make this all-argmax


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        OFFICIAL_PIPELINE_ARGS,
        SamplingParams(temperature=0.7, top_p=0.97),
        SamplingParams(top_p=0.95, top_k=300),
        SamplingParams(top_p=1.0, top_k=5),
    ],
    ids=["g1", "official", "wide_cold", "large_top_k", "top_k_only"],
)
def test_every_path_draws_the_same(params):
    """Fast path / histogram, candidate draw / blocked draw: the same tokens whichever runs.

    fast_candidates 1 forces the histogram and the blocked draw over V, 1024 (= V) the candidates
    alone; rows of different widths make rows of one batch take different bins and counts.
    """
    V, B = 1024, 600
    rng = np.random.default_rng(9)
    logits = (rng.standard_normal((B, V)) * np.linspace(0.2, 6.0, B)[:, None]).astype(np.float32)
    u = rng.random(B)
    want = sample(logits, params, u)
    draws = {k: run(head_session(V, fast_candidates=k), logits, params, uniform=u)["y"] for k in (1, 16, 256, 1024)}
    for k, got in draws.items():  # the same cutoff and cdf up to float32 summation order
        assert np.mean(got == want) >= 0.998, f"fast_candidates={k}: {np.sum(got != want)} of {B} differ"
        assert np.mean(got == draws[256]) >= 0.998


def test_penalties_and_occurrence_exact(exempt_65536):
    """Penalized logits and occurence_next are bit-identical to the reference; T = 0 is argmax."""
    V = 65536
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((4, V)) * 3).astype(np.float32)
    rows = [SamplingParams(), OFFICIAL_PIPELINE_ARGS]
    for params in rows:
        occs = [
            as_float32_counts(history(V, exempt_65536, params, 200, s, np.argsort(logits[s])[-50:]), exempt_65536)
            for s in range(4)
        ]
        occ = Occurrence(np.stack([o.counts for o in occs]), np.stack([o.present for o in occs]))
        assert (occ.present & exempt_65536).any(axis=1).all()  # exempt tokens present with count 0
        for temperature in (0.0, 1.0):
            p = SamplingParams(
                temperature,
                params.top_p,
                params.top_k,
                params.alpha_presence,
                params.alpha_frequency,
                params.alpha_decay,
            )
            u = rng.random(4)
            out = run(
                head_session(V),
                logits,
                p,
                occurrence_to_onnx(occ, exempt_65536),
                u,
                outputs=("y", "occurence_next", PENALIZED),
            )
            penalized = apply_penalties(logits, occ, p)
            np.testing.assert_array_equal(out[PENALIZED], penalized)
            if temperature == 0:
                np.testing.assert_array_equal(out["y"], np.argmax(penalized, axis=-1))
            else:
                np.testing.assert_array_equal(out["y"], sample(penalized, p, u))
            nxt = update_occurrence(Occurrence(occ.counts.copy(), occ.present.copy()), out["y"], p, exempt_65536)
            np.testing.assert_array_equal(out["occurence_next"], occurrence_to_onnx(nxt, exempt_65536))


def test_exempt_token_keeps_presence_and_counts_never_underflow(exempt_1024):
    V = 1024
    digit = int(np.flatnonzero(exempt_1024)[3])
    logits = np.zeros((1, V), np.float32)
    logits[0, digit] = 50.0  # drawn every time
    sess, occ = head_session(V), np.zeros((1, V), np.float32)
    occ[0, 600] = np.finfo(np.float32).tiny * 2  # a count about to underflow
    params = SamplingParams(temperature=0, alpha_decay=0.1)
    for _ in range(3):
        out = run(sess, logits, params, occ, np.zeros(1))
        assert out["y"][0] == digit
        occ = out["occurence_next"]
    assert occ[0, digit] == 1.0  # a presence flag, not a count (the official count stays 0)
    assert occ[0, 600] == np.finfo(np.float32).tiny  # floored, still present
    pen = run(sess, logits, SamplingParams(temperature=0, alpha_frequency=0.0), occ, np.zeros(1), outputs=(PENALIZED,))[
        PENALIZED
    ]
    assert pen[0, digit] == 50.0 - 2.0 and pen[0, 600] == -2.0  # presence penalty only, both present


def test_fp16_logits_and_batch_rows(exempt_1024):
    V, B = 1024, 5
    rng = np.random.default_rng(3)
    logits16 = (rng.standard_normal((B, V)) * 2).astype(np.float16)
    params = SamplingParams(temperature=0.9, top_p=0.7, top_k=30)
    occs = [
        as_float32_counts(history(V, exempt_1024, params, 20 + 5 * b, b, np.arange(100)), exempt_1024) for b in range(B)
    ]
    occ = Occurrence(np.stack([o.counts for o in occs]), np.stack([o.present for o in occs]))
    u = rng.random(B)
    out = run(head_session(V, TensorProto.FLOAT16), logits16, params, occurrence_to_onnx(occ, exempt_1024), u)
    want = sample(apply_penalties(logits16.astype(np.float32), occ, params), params, u)
    np.testing.assert_array_equal(out["y"], want)
    nxt = update_occurrence(occ, want, params, exempt_1024)
    np.testing.assert_array_equal(out["occurence_next"], occurrence_to_onnx(nxt, exempt_1024))
    for b in range(B):  # each row on its own gives the same token
        single = Occurrence(occs[b].counts[None], occs[b].present[None])
        one = run(
            head_session(V, TensorProto.FLOAT16),
            logits16[b : b + 1],
            params,
            occurrence_to_onnx(single, exempt_1024),
            u[b : b + 1],
        )
        assert one["y"][0] == want[b]


def test_defaults_are_the_g1_card_and_seedless_draws_are_reproducible():
    V = 1024
    model = SamplingHead()(stub(V)).model
    sess = session(model)
    assert {i.name for i in sess.get_inputs()} == {"logits"}  # every head input has a default
    defaults = {i.name for i in sess.get_overridable_initializers()}
    assert defaults == {
        "occurence",
        "uniform",
        "token_ban",
        "temperature",
        "top_p",
        "top_k",
        "alpha_presence",
        "alpha_frequency",
        "alpha_decay",
    }
    logits = np.random.default_rng(0).standard_normal((2000, V)).astype(np.float32)
    u = np.random.default_rng(1).random(2000)
    assert np.array_equal(run(sess, logits, uniform=u)["y"], sample(logits, SamplingParams(), u))
    assert not np.array_equal(run(sess, logits, uniform=u)["y"], sample(logits, OFFICIAL_PIPELINE_ARGS, u))
    fresh, again = session(model), session(model)  # in-graph RandomUniformLike, seed 0
    first = [run(fresh, logits[:8])["y"] for _ in range(3)]
    assert not np.array_equal(first[0], first[1])  # the stream advances from run to run
    assert all(np.array_equal(a, run(again, logits[:8])["y"]) for a in first)  # a new session replays it


def test_io_metadata_and_required_uniform_variant():
    V = 1024
    m = SamplingHead()(stub(V)).model
    onnx.checker.check_model(m, full_check=True)
    ops = all_ops(m.graph)
    assert {"Softmax", "NonZero", "ScatterElements", "ScatterND", "TopK", "CumSum", "If", "RandomUniformLike"} <= ops
    assert "Multinomial" not in ops
    outs = {o.name: o.type.tensor_type.elem_type for o in m.graph.output}
    assert outs == {"head": TensorProto.FLOAT, "y": TensorProto.INT64, "occurence_next": TensorProto.FLOAT}
    ins = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    assert ins["occurence"] == TensorProto.FLOAT and ins["uniform"] == TensorProto.DOUBLE
    assert ins["temperature"] == TensorProto.DOUBLE and ins["top_k"] == TensorProto.INT64
    assert get_meta(m, "rwkv_opt.head") == "sampling" and "0.99" in get_meta(m, "rwkv_opt.sampling")
    assert get_meta(m, "rwkv_opt.passes") == "sampling"

    strict = SamplingHead(Config(random_fallback=False, emit_logits=False))(stub(V, opset=22)).model
    onnx.checker.check_model(strict, full_check=True)
    assert "RandomUniformLike" not in all_ops(strict.graph)
    assert "head" not in {o.name for o in strict.graph.output}
    sess = session(strict)
    assert {i.name for i in sess.get_inputs()} == {"logits", "uniform"}  # uniform is now required
    logits = np.random.default_rng(0).standard_normal((3, V)).astype(np.float32)
    u = np.array([0.1, 0.5, 0.9])
    assert np.array_equal(
        sess.run(["y"], {"logits": logits[:, None], "uniform": u})[0], sample(logits, SamplingParams(), u)
    )


def test_refusals():
    with pytest.raises(PassRefused, match="no rank-3 'head'"):
        SamplingHead()(helper.make_model(helper.make_graph([], "empty", [], [])))
    once = SamplingHead()(stub(64 * 16)).model
    with pytest.raises(PassRefused, match="already has a sampling head"):
        SamplingHead()(once)
    with pytest.raises(PassRefused, match="RandomUniformLike at opset >= 22"):
        SamplingHead()(stub(1024, opset=22))
    with pytest.raises(PassRefused, match="vocabulary size is unknown"):
        m = stub(1024, vocab_meta=False)
        m.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "V"
        SamplingHead()(m)


@pytest.mark.parametrize("mode", [LogitsMode.ALL, LogitsMode.LAST])
def test_on_the_tiny_model(tiny7, mode, exempt_1024):
    """Built model + head: y is drawn from the last position's logits, `head` is unchanged."""
    base = build_model(tiny7, BuildOptions(logits=mode))
    model = SamplingHead()(base).model
    onnx.checker.check_model(model, full_check=True)
    B, cfg = 2, tiny7.config
    feed = {"x": np.random.default_rng(0).integers(0, cfg.vocab, (B, 6)), **zero_feed(cfg, B)}
    u = np.array([0.25, 0.75])
    out = dict(zip([o.name for o in model.graph.output], session(model).run(None, {**feed, "uniform": u})))
    plain = session(build_model(tiny7, BuildOptions(logits=mode))).run(["head"], feed)[0]
    np.testing.assert_array_equal(out["head"], plain)
    want = sample(plain[:, -1], SamplingParams(), u)
    np.testing.assert_array_equal(out["y"], want)
    np.testing.assert_array_equal(
        out["occurence_next"],
        occurrence_to_onnx(
            update_occurrence(Occurrence.zeros(cfg.vocab, B), want, SamplingParams(), exempt_1024), exempt_1024
        ),
    )
