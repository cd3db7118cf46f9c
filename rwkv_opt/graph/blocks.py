"""Builders for the pieces of an RWKV-7 block. Each returns the values it made.

Layout letters: B batch, T time, C channels, H heads, N head size, F ffn dim, V vocab.
"""

from __future__ import annotations

import numpy as np

from rwkv_opt.graph.builder import FLOAT, GraphBuilder, Value
from rwkv_opt.graph.contract import Scope as SC
from rwkv_opt.reference.model import W_SCALE

INT64_MAX = np.iinfo(np.int64).max


def layer_norm(g: GraphBuilder, x: Value, w: Value, b: Value, eps: float = 1e-5) -> Value:
    return g.LayerNormalization(x, w, b, axis=-1, epsilon=eps)


def token_shift(g: GraphBuilder, x_BTC: Value, last_B1C: Value) -> tuple[Value, Value]:
    """-> (previous token for every t (B,T,C), last token to carry (B,1,C))."""
    with g.scope(SC.SHIFT):
        head = g.Slice(x_BTC, g.ints(0), g.ints(-1), g.ints(1))
        prev = g.Concat(last_B1C, head, axis=1)
        nxt = g.Slice(x_BTC, g.ints(-1), g.ints(INT64_MAX), g.ints(1))
    return prev, nxt


def lerp(g: GraphBuilder, x: Value, delta: Value, mix: Value) -> Value:
    """x + (prev - x) * mix, with delta = prev - x computed once per block."""
    return g.Add(x, g.Mul(delta, mix))


def lora(g: GraphBuilder, x: Value, a: Value, b: Value, mid: str | None = None, bias: Value | None = None):
    """(f(x @ A)) @ B [+ bias];  f in {None, Tanh, Sigmoid}."""
    h = g.MatMul(x, a)
    if mid is not None:
        h = g.op(mid, h)
    y = g.MatMul(h, b)
    return g.Add(bias, y) if bias is not None else y


def heads(g: GraphBuilder, x_BTC: Value, H: int, N: int) -> Value:
    return g.Reshape(x_BTC, g.ints(0, 0, H, N))


def wkv_scan(g: GraphBuilder, H: int, N: int, r, w, k, v, kk, b, s0_BHNN) -> tuple[Value, Value]:
    """The WKV recurrence as a Scan over T (inputs (B,T,H,N)); emits y only, never per-step states.

    S_t = S_{t-1} * w_t[key] - (S_{t-1} @ kk_t)[value] * b_t[key] + v_t[value] * k_t[key]
    y_t = S_t @ r_t
    """
    col = lambda t: g.Unsqueeze(t, g.ints(-1))  # noqa: E731  (B,T,H,N,1)
    row = lambda t: g.Unsqueeze(t, g.ints(-2))  # noqa: E731  (B,T,H,1,N)
    body = _wkv_step_body(H, N)
    s_out, y = g.op(
        "Scan",
        s0_BHNN,
        col(r),
        row(w),
        row(k),
        col(v),
        col(kk),
        row(b),
        outputs=2,
        body=body,
        num_scan_inputs=6,
        scan_input_axes=[1] * 6,
        scan_output_axes=[1],
    )
    y_BTHN = g.Squeeze(y, g.ints(-1))
    return y_BTHN, s_out


def _wkv_step_body(H: int, N: int):
    b = GraphBuilder("wkv_step")
    S = b.input("S", FLOAT, ["B", H, N, N])
    r = b.input("r", FLOAT, ["B", H, N, 1])
    w = b.input("w", FLOAT, ["B", H, 1, N])
    k = b.input("k", FLOAT, ["B", H, 1, N])
    v = b.input("v", FLOAT, ["B", H, N, 1])
    kk = b.input("kk", FLOAT, ["B", H, N, 1])
    bb = b.input("b", FLOAT, ["B", H, 1, N])
    with b.scope(SC.WKV_STEP):
        sa = b.MatMul(S, kk)  # removed value, read before decay
        S1 = b.Add(b.Sub(b.Mul(S, w), b.Mul(sa, bb)), b.Mul(v, k))
        y = b.MatMul(S1, r)
    b.output(S1, "S_out", FLOAT, ["B", H, N, N])
    b.output(y, "y", FLOAT, ["B", H, N, 1])
    return b.graph()


def decay(g: GraphBuilder, w_lora: Value) -> Value:
    """w = exp(-e^-0.5 * sigmoid(w0 + lora)); kept fp32 in every precision."""
    return g.Exp(g.Mul(g.Sigmoid(w_lora), g.const(W_SCALE)))


def l2_normalize(g: GraphBuilder, x: Value) -> Value:
    with g.scope(SC.NORMALIZE):
        n = g.ReduceL2(x, g.ints(-1), keepdims=1)
        return g.Div(x, g.Max(n, g.const(1e-12)))


def group_norm(g: GraphBuilder, y_BTHN: Value, C: int, N: int, w: Value, b: Value) -> Value:
    """Per-head normalisation (eps 64e-5) then the ln_x affine -> (B,T,C)."""
    with g.scope(SC.LN_X):
        yn = g.LayerNormalization(y_BTHN, g.const(np.ones(N)), g.const(np.zeros(N)), axis=-1, epsilon=64e-5)
        return g.Add(g.Mul(g.Reshape(yn, g.ints(0, 0, C)), w), b)


def tmix_projections(g: GraphBuilder, mixed, p, linear, normalize, H: int, N: int, v_first):
    """r, w, k, v, kk, a, gate of one time-mix block from its six lerped inputs (xr, xw, xk, xv, xa, xg).

    p(name) is the block's parameter `att.*`, linear(x, name) is x @ W^T for the block's Linear
    `name`, normalize the per-head L2 normalisation to use; v_first is None in block 0, which
    then returns its own v as v_first.
    """
    xr, xw, xk, xv, xa2, xg = mixed
    r = linear(xr, "att.receptance.weight")
    k = linear(xk, "att.key.weight")
    v = linear(xv, "att.value.weight")
    with g.scope(SC.DECAY):
        w = decay(g, lora(g, xw, p("att.w1"), p("att.w2"), "Tanh", p("att.w0")))
    with g.scope(SC.A):
        a = g.Sigmoid(lora(g, xa2, p("att.a1"), p("att.a2"), None, p("att.a0")))
    with g.scope(SC.GATE):
        gate = lora(g, xg, p("att.g1"), p("att.g2"), "Sigmoid")

    kk = normalize(g, heads(g, g.Mul(k, p("att.k_k")), H, N))  # (B,T,H,N)
    k = g.Mul(k, g.Add(g.Mul(g.Sub(a, g.const(1.0)), p("att.k_a")), g.const(1.0)))
    if v_first is None:
        v_first = v
    else:
        with g.scope(SC.V_MIX):
            vm = g.Sigmoid(lora(g, xv, p("att.v1"), p("att.v2"), None, p("att.v0")))
            v = g.Add(v, g.Mul(g.Sub(v_first, v), vm))
    return r, w, k, v, kk, a, gate, v_first
