"""The chunked WKV (and the direct single step) against the numpy reference recurrence.

Inputs cover the regimes of docs/wkv-chunked.md (section 5, traps 1 and 4): realistic, strong decay
(w ~ 0.545, where the inclusive/exclusive prefix-sum mix-ups show), weak decay (w ~ 1) and "delta" (a ~ 0.99 with
nearly parallel kk, where the nilpotent inverse explodes), always from a nonzero carried state.
The chunked form is fed log w; the reference gets w = exp(log w) in fp64, the exact decay (the
fp32 w itself is rounded: near w = 1 that rounding is 1e-3 of log w).
"""

from __future__ import annotations

import functools
from collections import Counter
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from rwkv_opt.graph.builder import FLOAT, GraphBuilder
from rwkv_testutil import ort_session
from rwkv_opt.graph.wkv_chunked import check_chunk, wkv_chunked, wkv_step
from rwkv_opt.reference.model import W_SCALE, ReferenceModel

H, N = 2, 64
TOL = 2e-5  # max|err| / std(ref), y and final state
REGIMES = ("realistic", "strong", "weak", "delta")
ROLES = ("r", "w", "k", "v", "kk", "a", "lw")


def make_inputs(B: int, T: int, regime: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    z = {"strong": 8 + 0.1 * f(B, T, H, N), "weak": -8 + 0.1 * f(B, T, H, N)}.get(regime, f(B, T, H, N))
    lw = (W_SCALE / (1 + np.exp(-z))).astype(np.float32)  # log w in (-0.6065, 0)
    kk = f(B, 1, H, N) + 0.05 * f(B, T, H, N) if regime == "delta" else f(B, T, H, N)
    a = np.full((B, T, H, N), 0.99, np.float32) if regime == "delta" else 1 / (1 + np.exp(-f(B, T, H, N)))
    return dict(
        r=f(B, T, H, N),
        w=np.exp(lw),
        k=0.5 * f(B, T, H, N),
        v=f(B, T, H, N),
        kk=(kk / np.linalg.norm(kk, axis=-1, keepdims=True)).astype(np.float32),
        a=a.astype(np.float32),
        lw=lw,
        s0=0.3 * f(B, H, N, N),
    )


def reference(x: dict):
    """ReferenceModel.wkv in fp64 (it reads only cfg.n_head / head_size from the model)."""
    B, T = x["r"].shape[:2]
    flat = lambda t: t.astype(np.float64).reshape(B, T, H * N)  # noqa: E731
    state = SimpleNamespace(wkv=[x["s0"].astype(np.float64)])
    me = SimpleNamespace(cfg=SimpleNamespace(n_head=H, head_size=N))
    y = ReferenceModel.wkv(
        me, 0, flat(x["r"]), np.exp(flat(x["lw"])), flat(x["k"]), flat(x["v"]), flat(x["kk"]), flat(x["a"]), state
    )
    return y.reshape(B, T, H, N), state.wkv[0]


def wkv_model(kind: str, chunk: int = 64, use_logw: bool = True) -> onnx.ModelProto:
    g = GraphBuilder("wkv")
    r, w, k, v, kk, a, lw = (g.input(n, FLOAT, ["B", "T", H, N]) for n in ROLES)
    s0 = g.input("s0", FLOAT, ["B", H, N, N])
    b = g.Mul(kk, a)
    with g.scope("wkv"):
        if kind == "step":
            y, s = wkv_step(g, H, N, r, w, k, v, kk, b, s0)
        else:
            y, s = wkv_chunked(g, H, N, r, w, k, v, kk, b, s0, chunk=chunk, logw=lw if use_logw else None)
    g.output(y, "y", FLOAT, ["B", "T", H, N])
    g.output(s, "s", FLOAT, ["B", H, N, N])
    return g.model()


@functools.lru_cache(maxsize=None)
def session(kind: str, chunk: int = 64, use_logw: bool = True):
    m = wkv_model(kind, chunk, use_logw)
    onnx.checker.check_model(m, full_check=True)
    return ort_session(m)


def run(sess, x):
    return sess.run(None, {i.name: x[i.name] for i in sess.get_inputs()})


def rel(a, b):
    return np.abs(a - b).max() / b.std()


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 1000])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("chunk,use_logw", [(64, True), (32, True), (16, False)], ids=["L64", "L32", "L16-Log(w)"])
def test_chunked_matches_reference(chunk, use_logw, regime, T):
    sess = session("chunk", chunk, use_logw)
    for B in (1, 3):
        x = make_inputs(B, T, regime, seed=1000 * B + T)
        y, s = run(sess, x)
        y_ref, s_ref = reference(x)
        assert y.shape == (B, T, H, N) and s.shape == (B, H, N, N)
        assert rel(y, y_ref) <= TOL, f"y: {rel(y, y_ref):.2e}"
        assert rel(s, s_ref) <= TOL, f"state: {rel(s, s_ref):.2e}"


@pytest.mark.parametrize("regime", REGIMES)
def test_step_matches_reference(regime):
    for B in (1, 3):
        x = make_inputs(B, 1, regime, seed=B)
        y, s = run(session("step"), x)
        y_ref, s_ref = reference(x)
        assert rel(y, y_ref) <= TOL and rel(s, s_ref) <= TOL


def test_batch_rows_are_independent():
    """Each batch row equals the same row run alone (padding, reshapes and the Scan keep rows apart)."""
    x = make_inputs(3, 77, "realistic", seed=5)
    y, s = run(session("chunk"), x)
    for i in range(3):
        yi, si = run(session("chunk"), {k: v[i : i + 1] for k, v in x.items()})
        assert rel(yi, y[i : i + 1]) <= 1e-6 and rel(si, s[i : i + 1]) <= 1e-6


def test_graph_shape():
    """One Scan (over chunks), no Log when fed log w, Trilu masks, no Loop."""
    ops = Counter(n.op_type for n in wkv_model("chunk").graph.node)
    assert ops["Scan"] == 1 and ops["Log"] == 0 and ops["Loop"] == 0 and ops["Trilu"] == 4
    assert Counter(n.op_type for n in wkv_model("chunk", use_logw=False).graph.node)["Log"] == 1
    assert "Scan" not in {n.op_type for n in wkv_model("step").graph.node}


@pytest.mark.parametrize("chunk", [0, 3, 24, 40, 128])
def test_bad_chunk_refused(chunk):
    assert check_chunk(chunk)
    with pytest.raises(ValueError, match="chunk"):
        wkv_model("chunk", chunk)
