"""RWKV-7 / RWKV-7a (DeepEmbed) forward in numpy, fp64 or fp32, for a sequence or one token.

Reads like RWKV-LM's `RWKV-v7/rwkv_v7_numpy.py`; pinned to BlinkDL's official `rwkv` package by
tests/reference/test_oracle.py. Shapes: B batch, T time, C n_embd, H heads, N head size, V vocab.
The WKV state S[h] is N x N indexed [value, key] and is always kept in fp32 or wider.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rwkv_opt.checkpoint.weights import Weights, layer_norm

W_SCALE = -0.606531  # -exp(-0.5)


@dataclass
class State:
    """Recurrent state per layer: token-shift of time mix and channel mix, and the WKV matrix."""

    att: np.ndarray  # (L, B, C)     LN1 output of the previous token
    wkv: np.ndarray  # (L, B, H, N, N)
    ffn: np.ndarray  # (L, B, C)     LN2 output of the previous token

    def copy(self) -> "State":
        return State(self.att.copy(), self.wkv.copy(), self.ffn.copy())


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def group_norm(x, w, b, n_head, eps=64e-5):  # x (B,T,C), per-head normalisation
    B, T, C = x.shape
    xh = x.reshape(B, T, n_head, -1)
    mu = xh.mean(-1, keepdims=True)
    var = ((xh - mu) ** 2).mean(-1, keepdims=True)
    return ((xh - mu) / np.sqrt(var + eps)).reshape(B, T, C) * w + b


def token_shift(x, prev):  # x (B,T,C), prev (B,C) -> previous token's x for every t
    return np.concatenate([prev[:, None, :], x[:, :-1]], axis=1)


class _Layers:
    """Each layer's weights in the reference's dtype: converted from the checkpoint once and kept
    while they fit in `cache_bytes` (None: all of them), converted again at each use beyond that,
    so a 7B checkpoint is checked in bounded memory (slower, not wrong)."""

    def __init__(self, weights: Weights, dtype: np.dtype, cache_bytes: int | None):
        self.w, self.dtype, self.n = weights, dtype, weights.config.n_layer
        self.budget = cache_bytes
        self.cache: dict[int, dict] = {}
        self.cached_bytes = 0

    def load(self, i: int) -> dict:
        w, p = self.w, f"blocks.{i}."
        z = {k[len(p) :]: w.f32(k, self.dtype) for k in w.raw if k.startswith(p) and "s_emb" not in k}
        for lin in ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"):
            z[lin] = z.pop(lin + ".weight").T  # used as x @ W^T
        z["att.r_k"] = z["att.r_k"].reshape(-1)
        if w.config.deepembed:
            z["ffn.s_emb"] = w.s_emb_folded(i, self.dtype)
        return z

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i in self.cache:
            return self.cache[i]
        z = self.load(i)
        size = sum(a.nbytes for a in z.values())
        if self.budget is None or self.cached_bytes + size <= self.budget:
            self.cache[i] = z
            self.cached_bytes += size
        return z

    def __iter__(self):
        return (self[i] for i in range(self.n))


class ReferenceModel:
    def __init__(self, weights: Weights, dtype=np.float64, cache_bytes: int | None = None):
        """`cache_bytes` bounds the converted layer weights kept between forward calls (None: all,
        converted up front); the embedding and head are always held."""
        self.cfg = weights.config
        self.dtype = np.dtype(dtype)
        f = lambda k: weights.f32(k, self.dtype)  # noqa: E731
        self.emb = weights.emb_ln0(self.dtype)
        self.ln_out = (f("ln_out.weight"), f("ln_out.bias"))
        self.head_T = f("head.weight").T
        self.layers = _Layers(weights, self.dtype, cache_bytes)
        if cache_bytes is None:
            for _ in self.layers:  # convert now, as before: later calls only compute
                pass

    def zero_state(self, batch: int = 1) -> State:
        c = self.cfg
        return State(
            np.zeros((c.n_layer, batch, c.n_embd), self.dtype),
            np.zeros((c.n_layer, batch, c.n_head, c.head_size, c.head_size), self.dtype),
            np.zeros((c.n_layer, batch, c.n_embd), self.dtype),
        )

    def forward(self, tokens, state: State | None = None, full_output: bool = True):
        """tokens (B,T) or (T,) ints -> logits (B,T,V) (or (B,1,V)) and the new state."""
        tokens = np.atleast_2d(np.asarray(tokens, dtype=np.int64))
        state = self.zero_state(tokens.shape[0]) if state is None else state.copy()
        x = self.emb[tokens]  # (B,T,C)
        v_first = None
        for i, z in enumerate(self.layers):
            x, v_first = self.time_mix(i, z, x, v_first, state)
            x = self.channel_mix(i, z, x, tokens, state)
        if not full_output:
            x = x[:, -1:]
        return layer_norm(x, *self.ln_out) @ self.head_T, state

    def time_mix(self, i, z, x, v_first, state):
        H, N = self.cfg.n_head, self.cfg.head_size
        B, T, C = x.shape
        xa = layer_norm(x, z["ln1.weight"], z["ln1.bias"])
        d = token_shift(xa, state.att[i]) - xa
        state.att[i] = xa[:, -1]
        xr, xw, xk, xv, xa2, xg = (xa + d * z["att.x_" + m] for m in "rwkvag")

        r = xr @ z["att.receptance"]
        k = xk @ z["att.key"]
        v = xv @ z["att.value"]
        w = np.exp(W_SCALE * sigmoid(z["att.w0"] + np.tanh(xw @ z["att.w1"]) @ z["att.w2"]))
        a = sigmoid(z["att.a0"] + (xa2 @ z["att.a1"]) @ z["att.a2"])
        g = sigmoid(xg @ z["att.g1"]) @ z["att.g2"]

        kk = (k * z["att.k_k"]).reshape(B, T, H, N)
        kk = (kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)).reshape(B, T, C)
        k = k * (1 + (a - 1) * z["att.k_a"])
        if i == 0:
            v_first = v
        else:
            v = v + (v_first - v) * sigmoid(z["att.v0"] + (xv @ z["att.v1"]) @ z["att.v2"])

        y = self.wkv(i, r, w, k, v, kk, a, state)
        y = group_norm(y, z["att.ln_x.weight"], z["att.ln_x.bias"], H)
        bonus = (r * k * z["att.r_k"]).reshape(B, T, H, N).sum(-1, keepdims=True)
        y = y + (bonus * v.reshape(B, T, H, N)).reshape(B, T, C)
        return x + (y * g) @ z["att.output"], v_first

    def wkv(self, i, r, w, k, v, kk, a, state):
        """The recurrence, one token at a time; S (B,H,N,N) is [value, key]."""
        H, N = self.cfg.n_head, self.cfg.head_size
        B, T, C = r.shape
        S = state.wkv[i]
        hv = lambda t: t.reshape(B, T, H, N)  # noqa: E731
        r, w, k, v, kk, a = map(hv, (r, w, k, v, kk, a))
        y = np.empty((B, T, H, N), S.dtype)
        for t in range(T):
            sa = S @ kk[:, t, :, :, None]  # (B,H,N,1) read before decay
            S = (
                S * w[:, t, :, None, :]
                - sa * (kk[:, t] * a[:, t])[:, :, None, :]
                + v[:, t, :, :, None] * k[:, t, :, None, :]
            )
            y[:, t] = (S @ r[:, t, :, :, None])[..., 0]
        state.wkv[i] = S
        return y.reshape(B, T, C).astype(r.dtype)

    def channel_mix(self, i, z, x, tokens, state):
        xf = layer_norm(x, z["ln2.weight"], z["ln2.bias"])
        kf = xf + (token_shift(xf, state.ffn[i]) - xf) * z["ffn.x_k"]
        state.ffn[i] = xf[:, -1]
        h = np.maximum(kf @ z["ffn.key"], 0) ** 2
        if self.cfg.deepembed:
            r = self.cfg.d_srank
            semb = z["ffn.s_emb"][tokens].reshape(*tokens.shape, r, r)  # (B,T,r,r)
            ss = ((xf @ z["ffn.s1"])[..., None, :] @ semb)[..., 0, :]  # (B,T,r)
            h = h * (ss @ z["ffn.s2"] + z["ffn.s0"])
        return x + h @ z["ffn.value"]
