"""sampling: the official RWKV sampler appended after the logits, in plain ONNX ops.

    before   ... -> head [B, T|1, V]
    after    ... -> head [B, T|1, V]                       (kept as an output when emit_logits)
                      └ last position -> fp32 -> bans -> presence/frequency penalties
                        -> T == 0 ? argmax
                           : softmax -> top-p -> top-k -> ** (1/temperature) -> inverse-CDF draw -> y [B]
                   occurence [B, V] -> decay, count y -> occurence_next [B, V]

The order and the exempt tokens are the official generate loop's (docs/rwkv7.md, "Sampling";
oracle: rwkv_opt.reference.sampler). It samples from the LAST position whatever the logits mode.
Layout letters: B batch, V vocab, K candidates, NB histogram bins, n present/kept entries.

I/O added (seed-compatible names). Every input has a default (an initializer of the same name,
which ORT honours as an overridable default and lists under get_overridable_initializers(), not
get_inputs(); it would log one warning per such input at load, so rwkv_opt.runtime.Session loads
models with this head at log severity "error"), so a program that feeds only `x` and the state runs:

    input            type     shape       default
    occurence        float32  [B|1, V]    zeros [1, V]: nothing generated yet ([1, V] serves all rows)
    uniform          float64  [B] or []   []: an in-graph RandomUniformLike(seed) draws (see below)
    temperature      float64  []          1.0   0 = greedy (argmax of the penalized logits)
    top_p            float64  []          0.5   >= 1 = no filtering
    top_k            int64    []          0     0 (or >= V) = off
    alpha_presence   float64  []          2.0
    alpha_frequency  float64  []          0.1
    alpha_decay      float64  []          0.99
    token_ban        int64    [n]         []    ids whose logit becomes -inf
    output: y int64 [B] (the drawn ids), occurence_next float32 [B, V]; `head` stays when emit_logits.

Defaults are the seed's (RWKV-7 G1 model card): `SamplingParams()`; they are also in the metadata
(rwkv_opt.sampling, with rwkv_opt.head = sampling). Real parameters are float64 because the
official loop computes with Python floats: the penalty is formed in float64 and rounded once, as
upstream, and ``np.array(0.7)`` is float64 in numpy anyway.

Presence, faithfully, in one float [B, V] (the seed's contract): a token is present iff its entry
is > 0. The 22 exempt tokens (text a substring of ' \t0123456789') officially count 0 but are still
present; their count is always 0, so their entry stores a presence FLAG (1.0 once drawn) instead
of a count, and their penalty is alpha_presence alone. A present token's decayed count is floored
at the smallest normal float32 (1.2e-38) so that it never underflows to "absent" (float32 would
after ~8,800 steps at 0.99; the official float64 dict keeps the key forever). The floor changes the
penalty by <= 1.2e-39 * alpha_frequency. Counts are carried as float32 between steps and updated in
float64 (decay, +1, one rounding), so given the same float32 occurence the head's penalties and
occurence_next are bit-identical to the numpy sampler's (occurrence_to_onnx / occurrence_from_onnx
convert). Only the n present entries are computed (NonZero), not all V.

The draw: u in [0, 1) per row; float64 cumsum of the final probabilities in token-id order,
divided by its last entry; y = the first token whose cdf > u (== np.random.choice / the numpy
sampler, so the same u gives the same token up to float32 softmax rounding at a cdf step). Fed
`uniform` -> reproducible by the caller. Not fed -> RandomUniformLike with Config.seed:
reproducible per session (a new session replays the same stream, which advances on every run;
seed=None: a fresh stream per session). ORT's CPU EP has no RandomUniformLike at opset >= 22, so
there the pass refuses unless random_fallback=False, which makes `uniform` a required input.

Top-p without sorting V. The cutoff is the sorted prob at which the float32 cumsum first reaches
top_p. Fast path: TopK(fast_candidates) — its cumsum is the reference's own prefix, so when every
row reaches top_p inside it the cutoff is read off. Wide distributions: probabilities go into
log-spaced bins (bins from the logits, x_max - x; ScatterElements add), the cumulative bin mass
finds the bin holding the cutoff, and only that bin's members are sorted (TopK) and summed
sequentially on top of the mass above it. Either way O(V) plus a small sort, never O(V log V);
the wide path agrees with a sorted cumsum up to float32 summation order. top_k uses TopK(k) with
the ONNX tie rule (lower id first), the same as the reference's stable sort.

Control flow (If nodes, so unused work is skipped): greedy | sample; in sample, no filter -> dense
draw over V (T == 1 uses the probs as they are, else exp(log p / T), within a few ulp of upstream's
pow) | filtered; in filtered, when the TopK candidates hold every kept token (small top_k, or the
K-th candidate below the cutoff) the draw runs over the K candidates re-sorted by id, else over the
kept tokens gathered by NonZero. Cost per step at V = 65,536, one CPU thread: ~0.2 ms on peaked
logits (fast path), ~0.7-1 ms on wide ones (benchmarks/sampling_overhead.py).
Refuses: a model without a rank-3 `head` output, a model that has a sampling head already,
opset < 16 (ScatterElements reduction), opset >= 22 with random_fallback, an unknown V.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from rwkv_opt import onnx_util
from rwkv_opt.graph import contract
from rwkv_opt.graph.blocks import INT64_MAX
from rwkv_opt.graph.builder import FLOAT, INT64, GraphBuilder, Value
from rwkv_opt.passes.base import Pass, PassConfig, PassResult, get_meta, mark_applied, register, set_meta
from rwkv_opt.reference.sampler import Occurrence, SamplingParams, occurrence_exempt_mask

NAME = "sampling"
DOUBLE = TensorProto.DOUBLE

OCCURRENCE = contract.Sampler.OCCURRENCE  # the seed's spelling
OCCURRENCE_NEXT = contract.Sampler.OCCURRENCE_NEXT
TOKEN = contract.Sampler.TOKEN
UNIFORM = contract.Sampler.UNIFORM
TOKEN_BAN = contract.Sampler.TOKEN_BAN
#: scalar runtime parameters (named as the SamplingParams fields): input name -> (ONNX type, numpy dtype)
PARAMS = {
    "temperature": (DOUBLE, np.float64),
    "top_p": (DOUBLE, np.float64),
    "top_k": (INT64, np.int64),
    "alpha_presence": (DOUBLE, np.float64),
    "alpha_frequency": (DOUBLE, np.float64),
    "alpha_decay": (DOUBLE, np.float64),
}
COUNT_FLOOR = float(np.finfo(np.float32).tiny)  # present tokens never decay below this
U_MAX = 1.0 - 2.0**-53  # largest float64 below 1
DRAW_BLOCK = 256  # tokens per block of the two-level inverse CDF


@dataclass(frozen=True)
class Config(PassConfig):
    emit_logits: bool = True  # keep `head` (the raw logits) as an output beside y
    random_fallback: bool = True  # draw in-graph (RandomUniformLike) when `uniform` is not fed
    seed: int | None = 0  # that generator's seed; None: a fresh one per session
    bins_per_octave: int | None = None  # top-p histogram resolution (speed only, never the result);
    # None: V // (8 * octaves) in [1, 256], i.e. ~V/8 bins per row
    octaves: int = 32  # probs below max * 2**-octaves share the last bin
    fast_candidates: int = 256  # top-p fast path: TopK size that usually holds the cutoff

    def bins(self, V: int) -> int:
        return self.bins_per_octave or min(256, max(1, V // (8 * self.octaves)))


def sampling_feeds(params: SamplingParams) -> dict[str, np.ndarray]:
    """The runtime inputs that set `params` on a model with this head."""
    feeds = {name: np.array(getattr(params, name), dtype) for name, (_, dtype) in PARAMS.items()}
    feeds[TOKEN_BAN] = np.array(params.token_ban, np.int64).reshape(-1)
    return feeds


def occurrence_to_onnx(occurrence: Occurrence, exempt: np.ndarray) -> np.ndarray:
    """The reference sampler's Occurrence as this head's `occurence` (float32; exempt: presence flag)."""
    return np.where(exempt & occurrence.present, 1.0, np.where(exempt, 0.0, occurrence.counts)).astype(np.float32)


def occurrence_from_onnx(occurence: np.ndarray, exempt: np.ndarray) -> Occurrence:
    """This head's `occurence` as the reference sampler's Occurrence (counts widened to float64)."""
    occurence = np.asarray(occurence, np.float32)
    return Occurrence(np.where(exempt, 0.0, occurence).astype(np.float64), occurence > 0)


def _logits_info(model: onnx.ModelProto):
    return next((o for o in model.graph.output if o.name == contract.LOGITS), None)


# ---- the head, one builder per stage ------------------------------------------------------------
def _param_inputs(g: GraphBuilder, V: int, batch_uniform: bool) -> dict[str, Value]:
    """Graph inputs, each with a same-named initializer as its default (except a required uniform)."""
    p: dict[str, Value] = {}
    for name, (onnx_type, dtype) in PARAMS.items():
        p[name] = g.input(name, onnx_type, [])
        g.weight(name, np.array(getattr(SamplingParams(), name), dtype), inline=True)
    p[TOKEN_BAN] = g.input(TOKEN_BAN, INT64, ["n_ban"])
    g.weight(TOKEN_BAN, np.zeros(0, np.int64), inline=True)
    # Defaulted inputs get their own dim names: "batch" would make ORT bind B to the default's 1 (or 0).
    p[OCCURRENCE] = g.input(OCCURRENCE, FLOAT, ["batch_or_1", V])
    g.weight(OCCURRENCE, np.zeros((1, V), np.float32), inline=True)
    p[UNIFORM] = g.input(UNIFORM, DOUBLE, ["batch"] if batch_uniform else ["batch_or_0"])
    if not batch_uniform:
        g.weight(UNIFORM, np.zeros(0, np.float64), inline=True)
    return p


def _last_position(g: GraphBuilder, logits: Value, info: onnx.ValueInfoProto) -> Value:
    """(B,T,V) -> (B,V) float32; a free Reshape when T is statically 1 (logits mode 'last')."""
    t_dim = info.type.tensor_type.shape.dim[1]
    if t_dim.HasField("dim_value") and t_dim.dim_value == 1:
        x_BV = g.Reshape(logits, g.ints(0, -1))
    else:
        x_BV = g.Gather(logits, g.const(-1, np.int64), axis=1)
    return x_BV if info.type.tensor_type.elem_type == FLOAT else g.Cast(x_BV, to=FLOAT)


def _branch(g: GraphBuilder, tag: str, elem_type: int, build) -> onnx.GraphProto:
    """An If branch built by `build(b) -> Value` under g's current scope (names never clash)."""
    b = GraphBuilder(tag, g.opset)
    path = g.path(tag)
    with b.scope(path[1:]):
        out = build(b)
    for name, tensor in list(b.initializers.items()):
        tensor.name = f"{path}/{name}"
        for node in b.nodes:
            node.input[:] = [tensor.name if i == name else i for i in node.input]
    b.output(out, f"{path}/output", elem_type, None)
    return b.graph()


def _penalties(g: GraphBuilder, x_BV: Value, p: dict, exempt_V: Value) -> tuple[Value, Value, Value]:
    """Bans -> -inf, then logit -= presence + count * frequency at the present tokens only.

    The penalty is formed in float64 and rounded once (as upstream's Python floats), on the n
    present entries (NonZero), so it costs O(V) compares plus O(n) arithmetic.
    -> (x_BV, occ_BV, present coordinates (n,2)).
    """
    with g.scope("ban"):
        shape = g.Concat(g.Shape(x_BV, start=0, end=1), g.Shape(p[TOKEN_BAN]), axis=0)  # (B, n_ban)
        idx = g.Expand(g.Unsqueeze(p[TOKEN_BAN], g.ints(0)), shape)
        x_BV = g.ScatterElements(x_BV, idx, g.Expand(g.const(-np.inf), shape), axis=1)
    occ_BV = g.Expand(p[OCCURRENCE], g.Shape(x_BV))  # the [1, V] default serves every row
    at_n2 = g.Transpose(g.NonZero(g.Greater(occ_BV, g.const(0.0))))
    count_n = g.Cast(g.GatherND(occ_BV, at_n2), to=DOUBLE)
    exempt_n = g.Gather(exempt_V, g.Gather(at_n2, g.const(1, np.int64), axis=1))
    count_n = g.Where(exempt_n, g.const(0.0, np.float64), count_n)  # exempt entries are flags
    penalty_n = g.Cast(g.Add(p["alpha_presence"], g.Mul(count_n, p["alpha_frequency"])), to=FLOAT)
    x_BV = g.ScatterND(x_BV, at_n2, g.Sub(g.GatherND(x_BV, at_n2), penalty_n))
    return x_BV, occ_BV, at_n2


def _top_p_cutoff(
    g: GraphBuilder, x_BV: Value, p_BV: Value, vals_BK: Value, top_p: Value, V: int, cfg: Config
) -> Value:
    """(B,1) float32: keep probs >= cutoff (0 when never reached). See the module doc.

    Fast path: the float32 cumsum of the K largest probs (vals_BK, sorted) is the reference's own
    cumsum prefix; when every row reaches top_p inside it, the cutoff is read off. Otherwise (wide
    distributions) the histogram search runs.
    """
    top_p32 = g.Cast(top_p, to=FLOAT)
    j = _count(g, g.Less(g.CumSum(vals_BK, g.const(1, np.int64)), top_p32))  # (B,1) first index reaching
    fast = g.Less(g.ReduceMax(j, keepdims=0), g.Squeeze(g.Shape(vals_BK, start=1, end=2)))
    return g.If(
        fast,
        then_branch=_branch(g, "fast", FLOAT, lambda b: b.GatherElements(vals_BK, j, axis=1)),
        else_branch=_branch(g, "wide", FLOAT, lambda b: _top_p_histogram(b, x_BV, p_BV, top_p32, V, cfg)),
    )


def _count(g: GraphBuilder, mask: Value) -> Value:
    """(B,1) int64: the number of True per row (float sums: exact to 2**24, vectorized)."""
    return g.Cast(g.ReduceSum(g.Cast(mask, to=FLOAT), g.ints(-1), keepdims=1), to=INT64)


def _top_p_histogram(g: GraphBuilder, x_BV: Value, p_BV: Value, top_p32: Value, V: int, cfg: Config) -> Value:
    """The cutoff without sorting V: bin mass finds the bin holding it, then that bin alone is sorted.

    Bins come from the logits (log p - log p_max == x - x_max), monotone in p, no Log over V.
    """
    per_octave = cfg.bins(V)
    nb = per_octave * cfg.octaves
    with g.scope("bins"):
        depth = g.Mul(
            g.Sub(g.ReduceMax(x_BV, g.ints(-1), keepdims=1), x_BV), g.const(per_octave / math.log(2))
        )  # >= 0; +inf where banned
        bin_BV = g.Cast(g.Min(depth, g.const(float(nb - 1))), to=TensorProto.INT32)  # 0 holds the largest
        zeros = g.ConstantOfShape(g.Concat(g.Shape(p_BV, start=0, end=1), g.ints(nb), axis=0))
        mass = g.ScatterElements(zeros, bin_BV, p_BV, axis=1, reduction="add")  # (B,NB)
    with g.scope("find_bin"):
        cum = g.CumSum(mass, g.const(1, np.int64))
        b_star = _count(g, g.Less(cum, top_p32))  # (B,1)
        active = g.Less(b_star, g.const(nb, np.int64))
        b_star = g.Min(b_star, g.const(nb - 1, np.int64))
        above = g.GatherElements(g.Sub(cum, mass), b_star, axis=1)  # (B,1) mass above
    with g.scope("in_bin"):
        member = g.Equal(bin_BV, g.Cast(b_star, to=TensorProto.INT32))
        n_in = _count(g, member)  # (B,1)
        k = g.ReduceMax(g.Where(active, n_in, g.const(1, np.int64)), keepdims=0)  # one K for all rows
        vals_BK, _ = g.TopK(g.Where(member, p_BV, g.const(-1.0)), g.Reshape(k, g.ints(1)), axis=-1, outputs=2)
        run = g.CumSum(g.Concat(above, g.Max(vals_BK, g.const(0.0)), axis=1), g.const(1, np.int64))
        run_BK = g.Slice(run, g.ints(1), g.ints(INT64_MAX), g.ints(1))  # above + s_1..s_j
        j = g.Min(_count(g, g.Less(run_BK, top_p32)), g.Sub(n_in, g.const(1, np.int64)))  # rounding: bin min
        cutoff = g.GatherElements(vals_BK, j, axis=1)
    return g.Where(active, cutoff, g.const(0.0))


def _zeros_B1(g: GraphBuilder, x_BV: Value) -> Value:
    return g.ConstantOfShape(g.Concat(g.Shape(x_BV, start=0, end=1), g.ints(1), axis=0))


def _top_k_keep(g: GraphBuilder, p_BV: Value, keep_BV: Value, top_k: Value, on: Value) -> Value:
    """keep AND among the top_k largest probs (ties: lower id first); an If, free when top_k is off."""

    def top_k_branch(b: GraphBuilder) -> Value:
        _, idx_BK = b.TopK(p_BV, b.Reshape(top_k, b.ints(1)), axis=-1, outputs=2)
        hits = b.ScatterElements(
            b.ConstantOfShape(b.Shape(p_BV)), idx_BK, b.Expand(b.const(1.0), b.Shape(idx_BK)), axis=1
        )
        return b.And(keep_BV, b.Cast(hits, to=TensorProto.BOOL))

    return g.If(
        on,
        then_branch=_branch(g, "on", TensorProto.BOOL, top_k_branch),
        else_branch=_branch(g, "off", TensorProto.BOOL, lambda b: b.Identity(keep_BV)),
    )


def _uniform(g: GraphBuilder, x_BV: Value, uniform: Value, cfg: Config) -> Value:
    """(B,) float64 u in [0, U_MAX]: the fed uniform, or in-graph random numbers when it is empty."""
    if cfg.random_fallback:
        b1 = g.Shape(x_BV, start=0, end=1)
        seed = {} if cfg.seed is None else {"seed": float(cfg.seed)}
        rnd_B = g.RandomUniformLike(
            g.ConstantOfShape(b1, value=onnx.helper.make_tensor("", DOUBLE, [1], [0.0])), dtype=DOUBLE, **seed
        )
        uniform = g.Slice(g.Concat(uniform, rnd_B, axis=0), g.ints(0), b1, g.ints(0))
    return g.Clip(uniform, g.const(0.0, np.float64), g.const(U_MAX, np.float64))


def _inverse_temperature(g: GraphBuilder, temperature: Value) -> Value:
    """float32 1/T as upstream's `probs ** (1.0 / temperature)` rounds it (T == 0: 1, greedy elsewhere)."""
    t = g.Where(g.Equal(temperature, g.const(0.0, np.float64)), g.const(1.0, np.float64), temperature)
    return g.Cast(g.Div(g.const(1.0, np.float64), t), to=FLOAT)


def _tempered(g: GraphBuilder, p_BV: Value, temperature: Value) -> Value:
    """probs ** (1/T) over V: the probs as they are when T == 1 (as upstream), else exp(log p / T),
    vectorized and within a few ulp of upstream's elementwise pow (which costs ~10x more here)."""
    inv_t = _inverse_temperature(g, temperature)
    return g.If(
        g.Equal(inv_t, g.const(1.0)),
        then_branch=_branch(g, "t1", FLOAT, lambda b: b.Identity(p_BV)),
        else_branch=_branch(g, "pow", FLOAT, lambda b: b.Exp(b.Mul(b.Log(p_BV), inv_t))),
    )


def _draw_blocked(g: GraphBuilder, w_BV: Value, u_B: Value, V: int) -> Value:
    """Inverse CDF over V weights (0 = not kept) in token-id order: the first token whose float64
    cdf / total > u, found in two levels (block sums, then one block's cumsum) instead of a
    sequential cumsum over V. The cdf agrees with the reference's to float64 rounding; a draw can
    only land on a positive weight (clamped into the block's first..last positive entry)."""
    nblk = -(-V // DRAW_BLOCK)
    w = g.Cast(w_BV, to=DOUBLE)
    if nblk * DRAW_BLOCK != V:
        w = g.Pad(w, g.ints(0, 0, 0, nblk * DRAW_BLOCK - V))
    w3 = g.Reshape(w, g.ints(0, nblk, DRAW_BLOCK))  # (B,NBLK,BLOCK)
    block = g.ReduceSum(w3, g.ints(-1), keepdims=0)  # (B,NBLK)
    cum = g.CumSum(block, g.const(1, np.int64))
    total = g.Slice(cum, g.ints(-1), g.ints(INT64_MAX), g.ints(1))  # (B,1)
    u_B1 = g.Unsqueeze(u_B, g.ints(1))
    b_B1 = g.Min(_count(g, g.LessOrEqual(g.Div(cum, total), u_B1)), g.const(nblk - 1, np.int64))
    base = g.GatherElements(g.Sub(cum, block), b_B1, axis=1)  # weight before it
    at = g.Expand(g.Unsqueeze(b_B1, g.ints(2)), g.Concat(g.Shape(w3, start=0, end=1), g.ints(1, DRAW_BLOCK), axis=0))
    row = g.Squeeze(g.GatherElements(w3, at, axis=1), g.ints(1))  # (B,BLOCK)
    cdf = g.Div(g.Add(base, g.CumSum(row, g.const(1, np.int64))), total)
    positive = g.Cast(g.Greater(row, g.const(0.0, np.float64)), to=TensorProto.INT32)
    first = g.ArgMax(positive, axis=1, keepdims=1)
    last = g.ArgMax(positive, axis=1, keepdims=1, select_last_index=1)
    k_B1 = g.Max(g.Min(_count(g, g.LessOrEqual(cdf, u_B1)), last), first)
    return g.Squeeze(g.Add(g.Mul(b_B1, g.const(DRAW_BLOCK, np.int64)), k_B1), g.ints(1))


def _occurrence_next(g: GraphBuilder, y_B: Value, occ_BV: Value, at_n2: Value, decay: Value, exempt_V: Value) -> Value:
    """Present: count <- max(count * decay, floor); exempt flag stays 1; then the drawn token counts.

    Only the n present entries and the B drawn ones are computed (float64, rounded once).
    """
    floor = g.const(COUNT_FLOOR, np.float64)
    one = g.const(1.0, np.float64)

    def decayed(count, exempt):
        return g.Where(exempt, one, g.Max(g.Mul(count, decay), floor))

    with g.scope("present"):
        count_n = g.Cast(g.GatherND(occ_BV, at_n2), to=DOUBLE)
        exempt_n = g.Gather(exempt_V, g.Gather(at_n2, g.const(1, np.int64), axis=1))
        nxt = g.ScatterND(occ_BV, at_n2, g.Cast(decayed(count_n, exempt_n), to=FLOAT))
    with g.scope("drawn"):
        y_B1 = g.Unsqueeze(y_B, g.ints(1))
        count_B1 = g.Cast(g.GatherElements(occ_BV, y_B1, axis=1), to=DOUBLE)
        exempt_B1 = g.Gather(exempt_V, y_B1)
        was = g.Where(
            g.Greater(count_B1, g.const(0.0, np.float64)), decayed(count_B1, exempt_B1), g.const(0.0, np.float64)
        )
        new_B1 = g.Where(exempt_B1, one, g.Add(was, one))
        return g.ScatterElements(nxt, y_B1, g.Cast(new_B1, to=FLOAT), axis=1)


def _sample(g: GraphBuilder, x_BV: Value, p: dict, u_B: Value, V: int, cfg: Config) -> Value:
    """softmax -> [top-p, top-k] -> ** (1/T) -> inverse-CDF draw; unfiltered draws skip the filters."""
    p_BV = g.Softmax(x_BV, axis=-1)
    top_p_on = g.Less(p["top_p"], g.const(1.0, np.float64))
    top_k = p["top_k"]
    top_k_on = g.And(g.Greater(top_k, g.const(0, np.int64)), g.Less(top_k, g.const(V, np.int64)))

    def filtered(b: GraphBuilder) -> Value:
        return _sample_filtered(b, x_BV, p_BV, p, top_p_on, top_k_on, u_B, V, cfg)

    return g.If(
        g.Or(top_p_on, top_k_on),
        then_branch=_branch(g, "filtered", INT64, filtered),
        else_branch=_branch(g, "all", INT64, lambda b: _draw_blocked(b, _tempered(b, p_BV, p["temperature"]), u_B, V)),
    )


def _sample_filtered(
    g: GraphBuilder,
    x_BV: Value,
    p_BV: Value,
    p: dict,
    top_p_on: Value,
    top_k_on: Value,
    u_B: Value,
    V: int,
    cfg: Config,
) -> Value:
    """Top-p and/or top-k, then the draw; among the TopK candidates alone when they hold every kept token."""
    k0 = min(V, cfg.fast_candidates)
    vals_BK, ids_BK = g.TopK(p_BV, g.ints(k0), axis=-1, outputs=2)  # sorted, ties: lower id
    with g.scope("top_p"):

        def cutoff(b: GraphBuilder) -> Value:
            return _top_p_cutoff(b, x_BV, p_BV, vals_BK, p["top_p"], V, cfg)

        cutoff_B1 = g.If(
            top_p_on,
            then_branch=_branch(g, "on", FLOAT, cutoff),
            else_branch=_branch(g, "off", FLOAT, lambda b: _zeros_B1(b, p_BV)),
        )
    top_k, T = p["top_k"], p["temperature"]
    if k0 == V:
        within = g.const(True, np.bool_)
    else:  # every kept token is a candidate: a small top_k, or the K-th candidate is below the cutoff
        small_k = g.And(top_k_on, g.LessOrEqual(top_k, g.const(k0, np.int64)))
        last = g.Slice(vals_BK, g.ints(k0 - 1), g.ints(k0), g.ints(1))
        spill = g.ReduceMax(g.Cast(g.GreaterOrEqual(last, cutoff_B1), to=FLOAT), keepdims=0)
        within = g.Or(small_k, g.Equal(spill, g.const(0.0)))

    def general(b: GraphBuilder) -> Value:
        keep_BV = _top_k_keep(b, p_BV, b.GreaterOrEqual(p_BV, cutoff_B1), top_k, top_k_on)
        return _draw_blocked(b, b.Where(keep_BV, _tempered(b, p_BV, T), b.const(0.0)), u_B, V)

    with g.scope("draw"):
        return g.If(
            within,
            then_branch=_branch(
                g,
                "candidates",
                INT64,
                lambda b: _draw_candidates(b, vals_BK, ids_BK, cutoff_B1, top_k, top_k_on, T, u_B),
            ),
            else_branch=_branch(g, "general", INT64, general),
        )


def _draw_candidates(
    g: GraphBuilder,
    vals_BK: Value,
    ids_BK: Value,
    cutoff_B1: Value,
    top_k: Value,
    top_k_on: Value,
    temperature: Value,
    u_B: Value,
) -> Value:
    """The draw over the K candidates (which hold every kept token), re-sorted into token-id order so
    that the cdf, and the token a given u picks, are the reference's."""
    rank_K = g.Range(g.const(0, np.int64), g.Squeeze(g.Shape(vals_BK, start=1, end=2)), g.const(1, np.int64))
    in_top_k = g.Or(g.Not(top_k_on), g.Less(rank_K, top_k))
    keep_BK = g.And(g.GreaterOrEqual(vals_BK, cutoff_B1), in_top_k)
    w_BK = g.Where(keep_BK, g.Pow(vals_BK, _inverse_temperature(g, temperature)), g.const(0.0))
    _, order_BK = g.TopK(g.Neg(g.Cast(ids_BK, to=FLOAT)), g.Shape(vals_BK, start=1, end=2), axis=-1, outputs=2)
    ids_BK = g.GatherElements(ids_BK, order_BK, axis=1)  # ascending ids (< 2**24)
    cdf = g.CumSum(g.Cast(g.GatherElements(w_BK, order_BK, axis=1), to=DOUBLE), g.const(1, np.int64))
    cdf = g.Div(cdf, g.Slice(cdf, g.ints(-1), g.ints(INT64_MAX), g.ints(1)))
    k_B1 = g.Min(
        _count(g, g.LessOrEqual(cdf, g.Unsqueeze(u_B, g.ints(1)))),
        g.Sub(g.Shape(vals_BK, start=1, end=2), g.const(1, np.int64)),
    )
    return g.Squeeze(g.GatherElements(ids_BK, k_B1, axis=1), g.ints(1))


def build_head(
    g: GraphBuilder, logits: Value, logits_info: onnx.ValueInfoProto, V: int, exempt: np.ndarray, cfg: Config
) -> None:
    """Add the sampling head's inputs, nodes and outputs (y, occurence_next) to `g`."""
    p = _param_inputs(g, V, batch_uniform=not cfg.random_fallback)
    with g.scope("sampling"):
        exempt_V = g.const(exempt, np.bool_)
        x_BV = _last_position(g, logits, logits_info)
        with g.scope("penalties"):
            x_BV, occ_BV, at_n2 = _penalties(g, x_BV, p, exempt_V)
        u_B = _uniform(g, x_BV, p[UNIFORM], cfg)
        greedy = g.Equal(p["temperature"], g.const(0.0, np.float64))
        y_B = g.If(
            greedy,
            then_branch=_branch(g, "greedy", INT64, lambda b: b.ArgMax(x_BV, axis=-1, keepdims=0)),
            else_branch=_branch(g, "sample", INT64, lambda b: _sample(b, x_BV, p, u_B, V, cfg)),
        )
        with g.scope("occurrence"):
            occ_next = _occurrence_next(g, y_B, occ_BV, at_n2, p["alpha_decay"], exempt_V)
    g.output(y_B, TOKEN, INT64, ["batch"])
    g.output(occ_next, OCCURRENCE_NEXT, FLOAT, ["batch", V])


# ---- the pass -------------------------------------------------------------------------------------
@register
class SamplingHead(Pass):
    name = NAME
    Config = Config
    in_place = True  # appends its nodes to the model it is given
    description = "in-graph official sampler: penalties, top-p, top-k, temperature, draw -> y, occurence_next"

    def requires(self, model: onnx.ModelProto) -> str | None:
        out = _logits_info(model)
        if out is None or len(out.type.tensor_type.shape.dim) != 3:
            return f"the model has no rank-3 '{contract.LOGITS}' (logits) output to sample from"
        names = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
        if get_meta(model, contract.Key.SAMPLER) == NAME or TOKEN in names or OCCURRENCE in names:
            return "the model already has a sampling head (output 'y' / input 'occurence')"
        opset = onnx_util.opset(model)
        if opset < 16:
            return f"opset {opset} < 16 has no ScatterElements reduction; rebuild with --opset 21"
        if opset >= 22 and self.config.random_fallback:
            return (
                f"opset {opset}: ORT's CPU EP has no RandomUniformLike at opset >= 22; rebuild with "
                "--opset 21 or set random_fallback=False (then 'uniform' is a required input)"
            )
        if self._vocab(model) is None:
            return "the vocabulary size is unknown (no rwkv_opt.vocab metadata, symbolic logits width)"
        return None

    @staticmethod
    def _vocab(model: onnx.ModelProto) -> int | None:
        meta = get_meta(model, contract.Key.VOCAB)
        if meta is not None:
            return int(meta)
        dim = _logits_info(model).type.tensor_type.shape.dim[2]
        return dim.dim_value if dim.HasField("dim_value") else None

    def run(self, model: onnx.ModelProto) -> PassResult:
        cfg, V = self.config, self._vocab(model)
        logits, exempt = _logits_info(model), occurrence_exempt_mask(size=V)
        g = GraphBuilder("sampling", onnx_util.opset(model))
        build_head(g, Value(contract.LOGITS), logits, V, exempt, cfg)
        _append(model, g)
        if not cfg.emit_logits:
            model.graph.output.remove(logits)
        set_meta(model, contract.Key.SAMPLER, NAME)
        set_meta(
            model,
            contract.Key.SAMPLING,
            json.dumps(
                {
                    "defaults": {k: v.tolist() for k, v in sampling_feeds(SamplingParams()).items()},
                    "uniform": "required"
                    if not cfg.random_fallback
                    else f"optional; when not fed: RandomUniformLike(seed={cfg.seed})",
                    "presence": "entry > 0; exempt tokens store a presence flag (1.0), not a count",
                    "logits_output": cfg.emit_logits,
                },
                sort_keys=True,
            ),
        )
        mark_applied(model, NAME)
        notes = [
            f"V={V}, {int(exempt.sum())} exempt tokens, uniform {'required' if not cfg.random_fallback else 'optional'}"
        ]
        return PassResult(model, True, notes)


def _append(model: onnx.ModelProto, g: GraphBuilder) -> None:
    """Merge the head built in `g` into `model`; its constants move under /sampling/ (no clashes)."""
    inputs = {i.name for i in g.inputs}
    rename = {n: f"/sampling/{n}" for n in g.initializers if n not in inputs}
    taken = {t.name for t in model.graph.initializer} | {n.name for n in model.graph.node}
    clash = taken & (set(rename.values()) | inputs | {n.name for n in g.nodes})
    assert not clash, f"sampling head names already in the model: {sorted(clash)[:3]}"
    for node in g.nodes:
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
    for name, tensor in g.initializers.items():
        tensor.name = rename.get(name, name)
        model.graph.initializer.append(tensor)
    model.graph.node.extend(g.nodes)
    model.graph.input.extend(g.inputs)
    model.graph.output.extend(g.outputs)
