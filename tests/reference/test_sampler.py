"""Sampler: against the official ``rwkv.utils.PIPELINE`` (sample_logits and generate loop).

What the official CPU path does with top_p = 1.0 (checked in
``test_official_top_p_one_is_greedy``): it looks for the first index where the float32
cumsum of the sorted probs is >= 1.0. Over a 65536-way softmax that sequential float32
sum ends near 0.9999, never 1.0, so ``np.argmax`` of an all-False array returns 0, the
cutoff is the largest prob and every draw is the argmax: "top_p = 1.0" is greedy.
Ours treats top_p >= 1 (and any top_p the cumsum never reaches) as "no filtering".

Draw equality: ``np.random.choice(p=probs)`` is inverse CDF on one
``random_sample()`` with ``searchsorted(cdf, u, side="right")``, so seeding numpy's
global RNG before the official call and feeding ``RandomState(seed).random_sample()``
to ours must give the same token (up to float32 softmax rounding, which would only
matter on a knife edge that random logits never hit).
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from rwkv_opt.reference.sampler import (
    OFFICIAL_PIPELINE_ARGS,
    Occurrence,
    SamplingParams,
    apply_penalties,
    occurrence_exempt_mask,
    sample,
    sample_step,
    sampling_probs,
    update_occurrence,
)
from rwkv_opt.reference.tokenizer import load_world_tokenizer

os.environ["RWKV_V7_ON"] = "1"  # before importing rwkv
torch = pytest.importorskip("torch")
rwkv_utils = pytest.importorskip("rwkv.utils")

V = 65536
CONFIGS = {
    "official": OFFICIAL_PIPELINE_ARGS,
    "g1": SamplingParams(),
    "temp_topk": SamplingParams(temperature=0.7, top_p=0.9, top_k=7),
    "hot_ban": SamplingParams(temperature=1.5, top_p=0.6, token_ban=(11, 33)),
}


@pytest.fixture(scope="module")
def pipeline():
    return rwkv_utils.PIPELINE(None, "rwkv_vocab_v20230424")  # the tokenizer is all we need


@pytest.fixture(scope="module")
def exempt():
    return occurrence_exempt_mask(load_world_tokenizer())


def uniform_for(seed: int) -> float:
    return float(np.random.RandomState(seed).random_sample())


def official_draw(pipeline, logits: np.ndarray, p: SamplingParams, seed: int) -> int:
    np.random.seed(seed)
    return pipeline.sample_logits(
        torch.from_numpy(logits.copy()), temperature=p.temperature, top_p=p.top_p, top_k=p.top_k
    )


def test_params():
    a = rwkv_utils.PIPELINE_ARGS()
    o = OFFICIAL_PIPELINE_ARGS
    assert (o.temperature, o.top_p, o.top_k) == (a.temperature, a.top_p, a.top_k)
    assert (o.alpha_presence, o.alpha_frequency, o.alpha_decay) == (a.alpha_presence, a.alpha_frequency, a.alpha_decay)
    assert SamplingParams() == SamplingParams(1.0, 0.5, 0, 2.0, 0.1, 0.99)


def test_exempt_mask_matches_official_rule(pipeline, exempt):
    tok = load_world_tokenizer()
    official = [i for i in range(1, tok.vocab_size) if pipeline.decode([i]) in " \t0123456789"]
    assert np.flatnonzero(exempt).tolist() == official and len(official) == 22
    assert exempt.shape == (V,)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_draws_equal_official(pipeline, name):
    p = CONFIGS[name]
    rng = np.random.default_rng(1)
    for seed in range(150):
        logits = (rng.standard_normal(4096) * rng.uniform(0.5, 4)).astype(np.float32)
        probs = sampling_probs(logits, p)
        ref = official_draw(pipeline, logits, p, seed)
        assert probs[ref] > 0, "official draw outside our support"
        assert sample(logits, p, uniform_for(seed)) == ref
        if p.top_k:
            assert np.count_nonzero(probs) <= p.top_k


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_generate_loop_matches_official(pipeline, exempt, name):
    """Run the real PIPELINE.generate on fixed logits; compare penalised logits, tokens, counts."""
    p = CONFIGS[name]
    rng = np.random.default_rng(2)
    steps = 60
    hot = np.array([1, 33, 34, 48, 49, 50, 11, 261, 300, 1000, 4000, 20000, 65529])  # incl. ' ', digits
    table = np.full((steps, V), -np.inf, np.float32)
    table[:, :65530] = rng.standard_normal((steps, 65530)).astype(np.float32) - 8
    table[:, hot] = rng.standard_normal((steps, len(hot))).astype(np.float32) * 0.5 + 4
    table[:, 33 + 16] += 3  # '0' (byte 0x30): an exempt token that keeps winning
    seen, fed = [], []

    class Model:  # returns the fixed logits of each step
        def forward(self, tokens, state):
            fed.append(list(tokens))
            return torch.from_numpy(table[len(fed) - 1].copy()), state

    orig = pipeline.sample_logits

    def recording(logits, **kw):
        seen.append(logits.numpy().copy())
        np.random.seed(len(seen))
        return orig(logits, **kw)

    pipeline.model, pipeline.sample_logits = Model(), recording
    args = rwkv_utils.PIPELINE_ARGS(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        alpha_frequency=p.alpha_frequency,
        alpha_presence=p.alpha_presence,
        alpha_decay=p.alpha_decay,
        token_ban=list(p.token_ban),
    )
    try:
        pipeline.generate("Hi", token_count=steps, args=args)
    finally:
        del pipeline.sample_logits
        pipeline.model = None
    official_tokens = [t[0] for t in fed[1:]]

    occ, dict_occ, ours = Occurrence.zeros(V), {}, []
    for i in range(steps):
        penalised = apply_penalties(table[i], occ, p)
        np.testing.assert_array_equal(penalised, seen[i])  # bit-exact
        tok = sample(penalised, p, uniform_for(i + 1))
        update_occurrence(occ, tok, p, exempt)
        ours.append(tok)
        for k in dict_occ:  # the official loop's arithmetic, replicated
            dict_occ[k] *= p.alpha_decay
        dict_occ[tok] = dict_occ.get(tok, 0) + (0 if exempt[tok] else 1)
        assert np.flatnonzero(occ.present).tolist() == sorted(dict_occ)
        assert all(occ.counts[k] == v for k, v in dict_occ.items())  # exact float64
    assert ours[: len(official_tokens)] == official_tokens
    assert len(set(ours)) > 2 and any(exempt[t] for t in ours)
    assert not set(ours) & set(p.token_ban)


def test_official_top_p_one_is_greedy(pipeline):
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(V) * 3).astype(np.float32)
    soft = torch.softmax(torch.from_numpy(logits), -1).numpy()
    assert np.cumsum(np.sort(soft)[::-1])[-1] < 1.0  # why: the float32 cumsum falls short
    p = SamplingParams(top_p=1.0, alpha_presence=0, alpha_frequency=0)
    assert {official_draw(pipeline, logits, p, s) for s in range(10)} == {int(np.argmax(logits))}
    probs = sampling_probs(logits, p)
    np.testing.assert_allclose(probs, soft, rtol=1e-5, atol=1e-12)  # ours: plain softmax
    assert len({sample(logits, p, uniform_for(s)) for s in range(50)}) > 40


def test_greedy(pipeline):
    rng = np.random.default_rng(4)
    for seed in range(5):
        logits = rng.standard_normal(V).astype(np.float32)
        p = SamplingParams(temperature=0.0)
        assert sample(logits, p, 0.999) == official_draw(pipeline, logits, p, seed) == int(np.argmax(logits))
        probs = sampling_probs(logits, p)
        assert probs[np.argmax(logits)] == 1.0 and probs.sum() == 1.0


def test_inverse_cdf_frequencies_follow_probs():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(64) * 2).astype(np.float32)
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=10)
    probs = sampling_probs(logits, p)
    n = 20000
    toks = sample(np.broadcast_to(logits, (n, 64)), p, (np.arange(n) + 0.5) / n)
    freq = np.bincount(toks, minlength=64) / n
    np.testing.assert_allclose(freq, probs, atol=2 / n)
    assert np.all(freq[probs == 0] == 0)


def test_batch_equals_rows(exempt):
    rng = np.random.default_rng(6)
    p = SamplingParams(top_k=50, temperature=0.9)
    logits = rng.standard_normal((3, V)).astype(np.float32) * 2
    occ_b, occ_r = Occurrence.zeros(V, batch=3), [Occurrence.zeros(V) for _ in range(3)]
    for step in range(5):
        u = rng.random(3)
        toks = sample_step(logits, occ_b, p, u, exempt)
        for b in range(3):
            assert sample_step(logits[b], occ_r[b], p, u[b], exempt) == toks[b]
            np.testing.assert_array_equal(occ_b.counts[b], occ_r[b].counts)
            np.testing.assert_array_equal(occ_b.present[b], occ_r[b].present)
    probs = sampling_probs(apply_penalties(logits, occ_b, p), p)
    for b in range(3):
        np.testing.assert_array_equal(probs[b], sampling_probs(apply_penalties(logits[b], occ_r[b], p), p))


def test_exempt_token_present_with_zero_count(exempt):
    p = SamplingParams()
    occ = Occurrence.zeros(V)
    update_occurrence(occ, 33, p, exempt)  # ' '
    assert occ.present[33] and occ.counts[33] == 0
    out = apply_penalties(np.zeros(V, np.float32), occ, p)
    assert out[33] == np.float32(-2.0) and out[34] == 0


def test_bad_uniform():
    with pytest.raises(ValueError):
        sample(np.zeros(8, np.float32), SamplingParams(), 1.0)
    assert sample(np.zeros(8, np.float32), replace(SamplingParams(), top_p=1.0), 0.99) == 7
