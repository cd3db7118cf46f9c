"""The training forward: token ids -> masked next-token loss, for ONE fixed (batch, seq) shape.

    x (B,T) ─ Gather(emb) ─ LN(ln0) ─ block 0 ─ ... ─ block L-1 ─ LN(ln_out) ─ MatMul(head^T) ─ z (B,T,V)
    z ─ log-softmax ─ nll[b,t] = -log p(x[b,t+1] | x[b,<=t])
    SFT:        loss = sum(wt * nll) / max(sum(wt), 1)            wt[b,t] = mask[b,t+1]
    REINFORCE:  loss = sum(wt * reward[b,t+1] * nll) / max(sum(wt), 1)

It differs from the inference graph (rwkv_opt.graph.model) in four ways, all for the gradient:
- Parameters keep their checkpoint names and layout (Linear weights [out, in], used through a
  Transpose; `emb` un-folded with ln0 applied in-graph; DeepEmbed's s_emb folding done per token
  in-graph), so what trains is exactly what a .pth stores and writes back without algebra.
- Parameters are graph INPUTS carrying no data; their arrays travel beside the model
  (`LossGraph.params`). The step graph decides which become constants (frozen) and which state.
- The WKV recurrence is unrolled over the fixed T (onnxsim's graph_grad, like every reverse-mode
  tool, has no gradient for Scan/Loop), and kk's L2 normalisation is spelled Sqrt(ReduceSum(x*x))
  / Clip(., 1e-12) because ReduceL2 and Max have no VJP rule there.
- The state starts at zero (training windows are independent) and is not an output.

Everything uses opset 17, the opset onnxsim.graph_grad's rules emit (ReduceMean with an `axes`
attribute). The graph reuses the block builders of rwkv_opt.graph.blocks where their ops are
differentiable (layer_norm, lerp, lora, heads, decay, group_norm, token_shift).

Layout letters: B batch, T time, C channels, H heads, N head size, F ffn dim, V vocab, D s_emb width.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import onnx

from rwkv_opt.graph.contract import Key
from rwkv_opt.checkpoint.weights import Weights
from rwkv_opt.config import ModelConfig
from rwkv_opt.graph import blocks as B
from rwkv_opt.graph.builder import FLOAT, INT64, GraphBuilder, Value

OPSET = 17
TOKENS, MASK, REWARD = "x", "mask", "reward"
LOSS, NLL = "loss", "nll"
# Layer 0 computes v_first itself; its v0/v1/v2 never reach the output and are not trained.
UNUSED = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


class Objective(str, enum.Enum):
    SFT = "sft"  # masked mean next-token cross-entropy
    REINFORCE = "reinforce"  # token-level reward-weighted negative log-likelihood


@dataclass(frozen=True)
class TrainShape:
    """The static shape every training/eval graph is built for (graph_grad needs static shapes)."""

    batch: int = 1
    seq: int = 64

    def __post_init__(self):
        assert self.batch >= 1 and self.seq >= 2, f"need batch >= 1 and seq >= 2, got {self}"


@dataclass
class LossGraph:
    """A loss model whose parameters are data-less graph inputs, plus their fp32 arrays."""

    model: onnx.ModelProto
    params: dict[str, np.ndarray]  # training layout (squeezed [1,1,C] vectors), fp32
    objective: Objective
    shape: TrainShape
    stop_gradient: frozenset[str] = field(default_factory=frozenset)  # node names
    embeddings: tuple[str, ...] = ()  # Gather nodes reading a parameter table (see step.py)


def training_params(weights: Weights) -> dict[str, np.ndarray]:
    """Every trained tensor, fp32, keyed by checkpoint name ([1,1,C] vectors squeezed to [C])."""
    return {k: np.ascontiguousarray(weights.f32(k)) for k in weights.raw if k not in UNUSED}


def checkpoint_layout(params: dict[str, np.ndarray], weights: Weights, dtype=np.float32) -> dict[str, np.ndarray]:
    """Training-layout arrays back in the checkpoint's own shapes and keys, as `dtype`.

    Keys not in `params` (layer 0's unused v0/v1/v2) keep the checkpoint's values."""
    out = {}
    for k, raw in weights.raw.items():
        a = params[k] if k in params else raw
        out[k] = np.asarray(a).astype(dtype).reshape(np.shape(raw))
    return out


class _LossBuilder:
    def __init__(self, params: dict[str, np.ndarray], cfg: ModelConfig, objective: Objective, shape: TrainShape):
        self.params, self.cfg, self.objective, self.shape = params, cfg, objective, shape
        self.g = GraphBuilder("rwkv7_train", OPSET)
        self.inputs: dict[str, Value] = {}
        self.stop: set[str] = set()
        self.embeddings: list[str] = []

    def p(self, key: str) -> Value:
        """The graph input for parameter `key` (declared on first use)."""
        if key not in self.inputs:
            arr = self.params[key]
            self.inputs[key] = self.g.input(key, FLOAT, list(arr.shape))
        return self.inputs[key]

    def linear(self, x_BTC: Value, key: str) -> Value:
        """x @ W^T for a torch-layout [out, in] weight, as one 2-D product over the B*T rows.

        2-D on purpose: graph_grad's MatMul rule differentiates a batched (B,T,C) @ (C,O) into a
        (B,C,O) weight gradient summed afterwards (B copies of the weight); (B*T,C) @ (C,O) gives
        (C,O) directly. ORT folds the Transpose into the product (FusedMatMul)."""
        g = self.g
        x = g.Reshape(x_BTC, g.ints(self.shape.batch * self.shape.seq, -1))
        y = g.MatMul(x, g.Transpose(self.p(key), perm=[1, 0]))
        return g.Reshape(y, g.ints(self.shape.batch, self.shape.seq, -1))

    def embed(self, table: str, flat_tokens: Value) -> Value:
        """Rows of a parameter table for (B*T) tokens -> (B,T,D)."""
        g = self.g
        rows = g.Gather(self.p(table), flat_tokens, axis=0)
        self.embeddings.append(g.nodes[-1].name)
        return g.Reshape(rows, g.ints(self.shape.batch, self.shape.seq, -1))

    def build(self) -> LossGraph:
        g, c, s = self.g, self.cfg, self.shape
        tokens = g.input(TOKENS, INT64, [s.batch, s.seq])
        mask = g.input(MASK, INT64, [s.batch, s.seq])
        reward = g.input(REWARD, FLOAT, [s.batch, s.seq]) if self.objective is Objective.REINFORCE else None
        flat = g.Reshape(tokens, g.ints(-1))
        with g.scope("emb"):
            x0 = B.layer_norm(
                g, self.embed("emb.weight", flat), self.p("blocks.0.ln0.weight"), self.p("blocks.0.ln0.bias")
            )
        x, v_first = x0, None
        for i in range(c.n_layer):
            with g.scope(f"blocks.{i}"):
                with g.scope("att"):
                    x, v_first = self.time_mix(i, x, v_first)
                with g.scope("ffn"):
                    x = self.channel_mix(i, x, x0, flat)
        with g.scope("head"):
            x = B.layer_norm(g, x, self.p("ln_out.weight"), self.p("ln_out.bias"))
            logits = self.linear(x, "head.weight")  # (B,T,V)
        with g.scope("loss"):
            loss, nll = self.loss(logits, tokens, mask, reward)
        g.output(loss, LOSS, FLOAT, [])
        g.output(nll, NLL, FLOAT, [s.batch, s.seq])
        # parameters are inputs in first-use order, after the data inputs
        model = g.model(
            metadata={Key.TRAIN + "objective": self.objective.value, Key.TRAIN + "shape": f"{s.batch}x{s.seq}"}
        )
        used = {k: self.params[k] for k in self.inputs}
        return LossGraph(model, used, self.objective, s, frozenset(self.stop), tuple(self.embeddings))

    def time_mix(self, i: int, x: Value, v_first):
        g, c, P = self.g, self.cfg, f"blocks.{i}."
        p = lambda n: self.p(P + n)  # noqa: E731
        H, N = c.n_head, c.head_size
        xa = B.layer_norm(g, x, p("ln1.weight"), p("ln1.bias"))
        prev, _ = B.token_shift(g, xa, g.const(np.zeros((self.shape.batch, 1, c.n_embd))))
        d = g.Sub(prev, xa)
        mixed = [B.lerp(g, xa, d, p(f"att.x_{m}")) for m in "rwkvag"]
        r, w, k, v, kk, a, gate, v_first = B.tmix_projections(
            g, mixed, p, lambda x, n: self.linear(x, P + n), l2_normalize, H, N, None if i == 0 else v_first
        )

        rh, wh, kh, vh, ah = (B.heads(g, t, H, N) for t in (r, w, k, v, a))
        with g.scope("wkv"):
            y = wkv_unrolled(g, self.shape.seq, H, N, rh, wh, kh, vh, kk, g.Mul(kk, ah))
        y = B.group_norm(g, y, c.n_embd, N, p("att.ln_x.weight"), p("att.ln_x.bias"))
        with g.scope("bonus"):
            rk = g.ReduceSum(g.Mul(B.heads(g, g.Mul(r, k), H, N), p("att.r_k")), g.ints(-1), keepdims=1)
            y = g.Add(y, g.Reshape(g.Mul(rk, vh), g.ints(0, 0, c.n_embd)))
        out = self.linear(g.Mul(y, gate), P + "att.output.weight")
        return g.Add(x, out), v_first

    def channel_mix(self, i: int, x: Value, x0: Value, flat_tokens: Value) -> Value:
        g, c, P = self.g, self.cfg, f"blocks.{i}."
        p = lambda n: self.p(P + n)  # noqa: E731
        xf = B.layer_norm(g, x, p("ln2.weight"), p("ln2.bias"))
        prev, _ = B.token_shift(g, xf, g.const(np.zeros((self.shape.batch, 1, c.n_embd))))
        kf = B.lerp(g, xf, g.Sub(prev, xf), p("ffn.x_k"))
        h = self.linear(kf, P + "ffn.key.weight")
        h = g.Mul(*(g.Relu(h),) * 2)
        if c.deepembed:
            with g.scope("deepembed"):
                r = c.d_srank
                # the official load-time fold s_emb + emb_ln0 @ s_emb_x^T, for this window's tokens only
                semb = g.Add(self.embed(P + "ffn.s_emb.weight", flat_tokens), self.linear(x0, P + "ffn.s_emb_x.weight"))
                semb = g.Reshape(semb, g.ints(0, 0, r, r))  # (B,T,r,r)
                ss = g.MatMul(g.Unsqueeze(g.MatMul(xf, p("ffn.s1")), g.ints(-2)), semb)
                ss = g.Squeeze(ss, g.ints(-2))  # (B,T,r)
                h = g.Mul(h, g.Add(g.MatMul(ss, p("ffn.s2")), p("ffn.s0")))
        return g.Add(x, self.linear(h, P + "ffn.value.weight"))

    def loss(self, logits: Value, tokens: Value, mask: Value, reward):
        """-> (scalar loss, nll (B,T)); position t predicts x[:, t+1], the last position nothing."""
        g, s, V = self.g, self.shape, self.cfg.vocab
        nxt = lambda t, pad: g.Concat(g.Slice(t, g.ints(1), g.ints(s.seq), g.ints(1)), pad, axis=1)  # noqa: E731
        target = nxt(tokens, g.const(np.zeros((s.batch, 1)), np.int64))  # (B,T)
        wt = g.Cast(nxt(mask, g.const(np.zeros((s.batch, 1)), np.int64)), to=onnx.TensorProto.FLOAT)
        onehot = g.Cast(
            g.Equal(g.Unsqueeze(target, g.ints(-1)), g.const(np.arange(V), np.int64)), to=onnx.TensorProto.FLOAT
        )  # (B,T,V)
        # log-sum-exp shifted by the row max; the max is a stop-gradient (its derivative cancels)
        m = g.ReduceMax(logits, axes=[-1], keepdims=1)
        self.stop.add(g.nodes[-1].name)
        zs = g.Sub(logits, m)
        lse = g.Log(g.ReduceSum(g.Exp(zs), g.ints(-1), keepdims=1))
        zt = g.ReduceSum(g.Mul(zs, onehot), g.ints(-1), keepdims=1)
        nll = g.Reshape(g.Sub(lse, zt), g.ints(s.batch, s.seq))  # (B,T)
        weight = wt if reward is None else g.Mul(wt, nxt(reward, g.const(np.zeros((s.batch, 1)))))
        count = g.Clip(g.ReduceSum(wt, keepdims=0), g.const(1.0))
        loss = g.Div(g.ReduceSum(g.Mul(nll, weight), keepdims=0), count)
        return loss, g.Mul(nll, wt)


def l2_normalize(g: GraphBuilder, x: Value) -> Value:
    """x / max(||x||_2, 1e-12) over the last axis, in ops that have VJP rules."""
    with g.scope("normalize"):
        n = g.Sqrt(g.ReduceSum(g.Mul(x, x), g.ints(-1), keepdims=1))
        return g.Div(x, g.Clip(n, g.const(1e-12)))


def wkv_unrolled(g: GraphBuilder, T: int, H: int, N: int, r, w, k, v, kk, b) -> Value:
    """The WKV recurrence from a zero state, unrolled over T. Inputs (B,T,H,N) -> y (B,T,H,N).

        S_t = S_{t-1} * w_t[key] - (S_{t-1} @ kk_t)[value] * b_t[key] + v_t[value] * k_t[key]
        y_t = S_t @ r_t                         (S is [value, key], as everywhere in rwkv-opt)

    Every input is split along T once; a (B,1,H,N) piece reshapes, without a copy or a
    Transpose, into a (B,H,N,1) column or a (B,H,1,N) row, and y is stacked back the same way.
    (A Transpose here gets pushed through the Split by ORT's transpose optimizer: T small
    Transposes per split, measured at ~15% of a 0.1B step.)
    """

    def steps(t_BTHN: Value, row: bool) -> list[Value]:
        parts = [t_BTHN] if T == 1 else list(g.op("Split", t_BTHN, outputs=T, axis=1))  # (B,1,H,N) each
        shape = g.ints(-1, H, 1, N) if row else g.ints(-1, H, N, 1)
        return [g.Reshape(pc, shape) for pc in parts]

    rs, ws, ks, vs, kks, bs = (
        steps(t, row) for t, row in ((r, False), (w, True), (k, True), (v, False), (kk, False), (b, True))
    )
    ys, S = [], None
    for t in range(T):
        with g.scope(f"t{t}"):
            vk = g.Mul(vs[t], ks[t])  # (B,H,N,N)
            if S is None:  # S_0 = 0: the first step is the write alone
                S = vk
            else:
                sa = g.MatMul(S, kks[t])  # (B,H,N,1)
                S = g.Add(g.Sub(g.Mul(S, ws[t]), g.Mul(sa, bs[t])), vk)
            ys.append(g.MatMul(S, rs[t]))  # (B,H,N,1)
    ys = [g.Reshape(y, g.ints(-1, 1, H, N)) for y in ys]  # (B,1,H,N)
    return ys[0] if T == 1 else g.Concat(*ys, axis=1)  # (B,T,H,N)


def build_loss_graph(
    weights: Weights, objective: Objective, shape: TrainShape, params: dict[str, np.ndarray] | None = None
) -> LossGraph:
    """The loss model for `weights` (or for `params`, arrays in the training layout)."""
    params = training_params(weights) if params is None else params
    return _LossBuilder(params, weights.config, objective, shape).build()
