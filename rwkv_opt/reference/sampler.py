"""The official RWKV sampler (``rwkv/utils.py`` PIPELINE, CPU path) in numpy.

Per generated token:

1. ``apply_penalties``: banned tokens -> -inf; every token generated so far loses
   ``alpha_presence + occurrence * alpha_frequency`` (penalty computed in float64 like
   the official Python floats, subtracted from float32 logits like the official torch
   in-place op).
2. ``sampling_probs``: softmax in float32; top-p cutoff (keep probs >= the sorted prob
   where the float32 cumsum first reaches top_p); top-k; ``probs ** (1/temperature)``;
   renormalise. Temperature is applied *after* top-p/top-k, as upstream.
3. ``sample``: inverse CDF on a caller-supplied uniform u in [0, 1): float64 cumsum,
   divided by its last entry, first index whose cdf > u. This is exactly what
   ``np.random.choice(p=probs)`` does, so with ``np.random.seed(s)`` and
   ``u = np.random.random_sample()`` the draw equals the official one.
4. ``update_occurrence``: all counts *= alpha_decay, then the drawn token's count
   += 1, or += 0 for the 22 tokens whose text is a substring of ' \\t0123456789'
   (they still become "present" and so still get the presence penalty).

Deliberate deviations from upstream, each for a case where upstream misbehaves:

* ``top_p >= 1`` means no filtering. Upstream looks for the first index where the
  float32 cumsum is >= 1.0; with a 65536-way softmax the sequential float32 sum falls
  short (measured ~0.9999), ``np.argmax`` of an all-False array is 0, the cutoff
  becomes the largest prob, and "top_p = 1.0" silently turns into greedy decoding.
  Likewise any top_p that the float32 cumsum never reaches keeps every token here.
* ``temperature == 0`` is greedy: one-hot at ``np.argmax`` (the first maximum).
  Upstream maps it to top_p = 0, which keeps *all* tied maxima and draws among them.
* top-k ties at the k-th value are broken by lower token id (stable sort); upstream
  uses whatever order numpy's unstable ``argsort`` leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rwkv_opt.reference.tokenizer import WorldTokenizer

MODEL_VOCAB = 65536  # rows of the RWKV-7 World embedding / head
EXEMPT_TEXT = " \t0123456789"


@dataclass(frozen=True)
class SamplingParams:
    """Sampler settings; defaults are the RWKV-7 G1 model card's (the seed project's)."""

    temperature: float = 1.0
    top_p: float = 0.5
    top_k: int = 0  # 0 = off
    alpha_presence: float = 2.0
    alpha_frequency: float = 0.1
    alpha_decay: float = 0.99
    token_ban: tuple[int, ...] = ()


#: The official ``PIPELINE_ARGS()`` defaults.
OFFICIAL_PIPELINE_ARGS = SamplingParams(1.0, 0.85, 0, 0.2, 0.2, 0.996)


@dataclass
class Occurrence:
    """Penalty state, shape [V] or [B, V]: float64 decayed counts and a presence mask.

    Presence is kept separately because an exempt token is present with count 0, and a
    decayed count may underflow to 0 while the official dict still holds the token.
    """

    counts: np.ndarray
    present: np.ndarray

    @classmethod
    def zeros(cls, vocab_size: int = MODEL_VOCAB, batch: int | None = None) -> "Occurrence":
        shape = (vocab_size,) if batch is None else (batch, vocab_size)
        return cls(np.zeros(shape, np.float64), np.zeros(shape, bool))


def occurrence_exempt_mask(tokenizer: "WorldTokenizer | None" = None, size: int = MODEL_VOCAB) -> np.ndarray:
    """Bool [size]: tokens whose (valid UTF-8) text is a substring of ' \\t0123456789'.

    Computed from the vocabulary (22 tokens: tab, space, digits, ' \\t', '01'..'89').
    Id 0 (end of document, text "") is not counted: upstream cannot even decode it.
    """
    if tokenizer is None:
        from rwkv_opt.reference.tokenizer import load_world_tokenizer

        tokenizer = load_world_tokenizer()
    mask = np.zeros(size, bool)
    for idx, token in tokenizer.idx2token.items():
        if 0 < idx < size:
            try:
                mask[idx] = token.decode("utf-8") in EXEMPT_TEXT
            except UnicodeDecodeError:
                pass
    return mask


def apply_penalties(logits: np.ndarray, occurrence: Occurrence, params: SamplingParams) -> np.ndarray:
    """Float32 logits [V] or [B, V] after bans and presence/frequency penalties (a copy)."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if params.token_ban:
        out[..., list(params.token_ban)] = -np.inf
    penalty = params.alpha_presence + occurrence.counts * params.alpha_frequency  # float64
    penalty = np.where(occurrence.present, penalty, 0.0).astype(np.float32)
    return out - penalty


def sampling_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The exact float32 distribution [V] or [B, V] that ``sample`` draws from."""
    x = np.asarray(logits, dtype=np.float32)
    if params.temperature == 0:
        probs = np.zeros(x.shape, np.float32)
        np.put_along_axis(probs, np.argmax(x, axis=-1)[..., None], 1.0, axis=-1)
        return probs
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    probs = full = e / np.sum(e, axis=-1, keepdims=True)
    if params.top_p < 1.0:
        sorted_desc = np.sort(probs, axis=-1)[..., ::-1]
        cum = np.cumsum(sorted_desc, axis=-1)  # float32, sequential, as upstream
        hit = cum >= np.float32(params.top_p)  # numpy compares a Python float as float32
        cutoff = np.take_along_axis(sorted_desc, np.argmax(hit, axis=-1)[..., None], axis=-1)
        cutoff = np.where(np.any(hit, axis=-1, keepdims=True), cutoff, np.float32(0))
        probs = np.where(probs < cutoff, np.float32(0), probs)
    k = int(params.top_k)
    if 0 < k < x.shape[-1]:
        order = np.argsort(-full, axis=-1, kind="stable")  # descending, ties by id
        np.put_along_axis(probs, order[..., k:], 0.0, axis=-1)
    if params.temperature != 1.0:
        probs = probs ** (1.0 / params.temperature)
    return (probs / np.sum(probs, axis=-1, keepdims=True)).astype(np.float32)


def sample(logits: np.ndarray, params: SamplingParams, uniform: float | np.ndarray) -> int | np.ndarray:
    """Draw by inverse CDF with the supplied uniform(s) in [0, 1).

    ``logits`` [V] -> int; [B, V] with ``uniform`` scalar or [B] -> int64 [B].
    Logits are used as given: call ``apply_penalties`` first.
    """
    x = np.asarray(logits, dtype=np.float32)
    if params.temperature == 0:
        idx = np.argmax(x, axis=-1)
    else:
        cdf = np.cumsum(sampling_probs(x, params).astype(np.float64), axis=-1)
        cdf /= cdf[..., -1:]
        u = np.asarray(uniform, dtype=np.float64)
        if np.any((u < 0) | (u >= 1)):
            raise ValueError("uniform must lie in [0, 1)")
        if x.ndim == 2:
            u = np.broadcast_to(u, x.shape[:1])[:, None]
        idx = np.sum(cdf <= u, axis=-1)  # == searchsorted(cdf, u, side="right")
    return int(idx) if x.ndim == 1 else idx.astype(np.int64)


def update_occurrence(
    occurrence: Occurrence, token: int | np.ndarray, params: SamplingParams, exempt_mask: np.ndarray
) -> Occurrence:
    """In place (and returned): decay all counts, then count the drawn token(s).

    ``token`` is an int for [V] state, or ints [B] for [B, V] state.
    """
    occurrence.counts *= params.alpha_decay
    tok = np.asarray(token, dtype=np.int64)
    weight = np.where(exempt_mask[tok], 0.0, 1.0)
    if occurrence.counts.ndim == 1:
        occurrence.counts[tok] += weight
        occurrence.present[tok] = True
    else:
        rows = np.arange(occurrence.counts.shape[0])
        occurrence.counts[rows, tok] += weight
        occurrence.present[rows, tok] = True
    return occurrence


def sample_step(
    logits: np.ndarray,
    occurrence: Occurrence,
    params: SamplingParams,
    uniform: float | np.ndarray,
    exempt_mask: np.ndarray,
) -> int | np.ndarray:
    """One full generation step: penalties, draw, occurrence update. Returns the token(s)."""
    token = sample(apply_penalties(logits, occurrence, params), params, uniform)
    update_occurrence(occurrence, token, params, exempt_mask)
    return token
