"""The base fp32 graph, built straight from the weights.

    x (B,T) ─ Gather(emb_ln0) ─┬─ block 0 ─ ... ─ block L-1 ─ [last position] ─ LN(ln_out) ─ MatMul(head^T) ─ head
                               └ DeepEmbed: Gather(s_emb_i) per block
    block i:  x += TimeMix(LN1(x), state_i);  x += ChannelMix(LN2(x), state_i)

With logits "last" (prefill and decode), block L-1 runs its WKV over every token (the state needs them)
and everything after it -- GroupNorm, bonus, gate, output projection, the residual and the whole channel
mix -- on the last two positions only (the channel mix's token shift reads the one before the last);
llama.cpp prunes its last layer the same way. 0.1B, T = 512: one of twelve FFNs' work at 2 positions
instead of 512 (reports/decode.md, session 7).

One graph serves any batch >= 1 and any T >= 1; the state goes in and comes out.
Linear weights are stored pre-transposed ([in, out]) so no Transpose runs at inference.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

import numpy as np
import onnx

from rwkv_opt.graph.contract import Key
from rwkv_opt import __version__
from rwkv_opt.checkpoint.weights import Weights
from rwkv_opt.graph import blocks as B
from rwkv_opt.graph import contract
from rwkv_opt.graph.contract import Scope as S
from rwkv_opt.graph.builder import DEFAULT_OPSET, FLOAT, INT64, GraphBuilder, Value
from rwkv_opt.progress import tick


class LogitsMode(str, enum.Enum):
    ALL = "all"  # logits for every position (B,T,V)
    LAST = "last"  # only the last position (B,1,V): what prefill/decode needs


@dataclass(frozen=True)
class BuildOptions:
    logits: LogitsMode = LogitsMode.ALL
    opset: int = DEFAULT_OPSET


class _ModelBuilder:
    def __init__(self, weights: Weights, opts: BuildOptions):
        self.w, self.cfg, self.opts = weights, weights.config, opts
        self.g = GraphBuilder("rwkv7", opts.opset)

    def param(self, key: str, transpose: bool = False):
        """The initializer for checkpoint key `key` (fp32, squeezed, optionally pre-transposed)."""
        arr = self.w.f32(key)
        if key.endswith("att.r_k"):
            arr = arr.reshape(-1)
        if transpose:
            return self.g.weight(contract.transposed(key), np.ascontiguousarray(arr.T))
        return self.g.weight(key, arr)

    def build(self) -> onnx.ModelProto:
        g, c = self.g, self.cfg
        tokens = g.input(contract.TOKENS, INT64, ["batch", "seq"])
        x = g.Gather(g.weight("emb.weight.ln0", self.w.emb_ln0()), tokens, name=S.EMB)
        v_first = None
        for i in range(c.n_layer):
            tick(i)
            names = contract.state_inputs(i)
            att = g.input(names[0], FLOAT, ["batch", 1, c.n_embd])
            wkv = g.input(names[1], FLOAT, ["batch", c.n_head, c.head_size, c.head_size])
            ffn = g.input(names[2], FLOAT, ["batch", 1, c.n_embd])
            # With only the last position's logits wanted, the last block runs its WKV (the state) over
            # every token and the rest on the last two positions (the FFN's token shift reads the one before).
            tail = i == c.n_layer - 1 and self.opts.logits is LogitsMode.LAST
            with g.scope(S.BLOCK.format(i=i)):
                with g.scope(S.ATT):
                    x, v_first, att_next, wkv_next = self.time_mix(i, x, v_first, att, wkv, tail)
                with g.scope(S.FFN):
                    x, ffn_next = self.channel_mix(i, x, _last2(g, tokens) if tail else tokens, ffn)
            self.outs = getattr(self, "outs", []) + [(att_next, ffn_next, wkv_next, i)]
        with g.scope(S.HEAD):
            if self.opts.logits is LogitsMode.LAST:
                x = g.Slice(x, g.ints(-1), g.ints(B.INT64_MAX), g.ints(1))
            x = B.layer_norm(g, x, self.param("ln_out.weight"), self.param("ln_out.bias"))
            logits = g.MatMul(x, self.param("head.weight", transpose=True))
        seq = "seq" if self.opts.logits is LogitsMode.ALL else 1
        g.output(logits, contract.LOGITS, FLOAT, ["batch", seq, c.vocab])
        for att_next, ffn_next, wkv_next, i in self.outs:
            names = contract.state_outputs(i)
            g.output(att_next, names[0], FLOAT, ["batch", 1, c.n_embd])
            g.output(wkv_next, names[1], FLOAT, ["batch", c.n_head, c.head_size, c.head_size])
            g.output(ffn_next, names[2], FLOAT, ["batch", 1, c.n_embd])
        return g.model(metadata=self.metadata())

    def time_mix(self, i, x, v_first, att_last, wkv_state, tail: bool = False):
        """The time mix of block i; with `tail`, its output covers only the last two positions."""
        g, c, P = self.g, self.cfg, f"blocks.{i}."
        p = lambda n, t=False: self.param(P + n, t)  # noqa: E731
        xa = B.layer_norm(g, x, p("ln1.weight"), p("ln1.bias"))
        prev, att_next = B.token_shift(g, xa, att_last)
        d = g.Sub(prev, xa)
        mixed = [B.lerp(g, xa, d, p(f"att.x_{m}")) for m in "rwkvag"]
        r, w, k, v, kk, a, gate, v_first = B.tmix_projections(
            g,
            mixed,
            p,
            lambda x, n: g.MatMul(x, p(n, True)),
            B.l2_normalize,
            c.n_head,
            c.head_size,
            None if i == 0 else v_first,
        )

        H, N = c.n_head, c.head_size
        rh, wh, kh, vh, ah = (B.heads(g, t, H, N) for t in (r, w, k, v, a))
        with g.scope(S.WKV):
            y, wkv_next = B.wkv_scan(g, H, N, rh, wh, kh, vh, kk, g.Mul(kk, ah), wkv_state)
        if tail:  # nothing after the state needs the earlier positions
            with g.scope(S.TAIL):
                y, r, k, vh, gate, x = (_last2(g, t) for t in (y, r, k, vh, gate, x))
        y = B.group_norm(g, y, c.n_embd, N, p("att.ln_x.weight"), p("att.ln_x.bias"))
        with g.scope(S.BONUS):
            rk = g.ReduceSum(B.heads(g, g.Mul(g.Mul(r, k), p("att.r_k")), H, N), g.ints(-1), keepdims=1)
            y = g.Add(y, g.Reshape(g.Mul(rk, vh), g.ints(0, 0, c.n_embd)))
        out = g.MatMul(g.Mul(y, gate), p("att.output.weight", True))
        return g.Add(x, out), v_first, att_next, wkv_next

    def channel_mix(self, i, x, tokens, ffn_last):
        g, c, P = self.g, self.cfg, f"blocks.{i}."
        p = lambda n, t=False: self.param(P + n, t)  # noqa: E731
        xf = B.layer_norm(g, x, p("ln2.weight"), p("ln2.bias"))
        prev, ffn_next = B.token_shift(g, xf, ffn_last)
        kf = B.lerp(g, xf, g.Sub(prev, xf), p("ffn.x_k"))
        h = g.MatMul(kf, p("ffn.key.weight", True))
        h = g.Mul(*(g.Relu(h),) * 2)
        if c.deepembed:
            with g.scope(S.DEEPEMBED):
                r = c.d_srank
                semb = g.Gather(g.weight(P + "ffn.s_emb.weight.folded", self.w.s_emb_folded(i)), tokens)
                semb = g.Reshape(semb, g.ints(0, 0, r, r))  # (B,T,r,r)
                ss = g.MatMul(g.Unsqueeze(g.MatMul(xf, p("ffn.s1")), g.ints(-2)), semb)
                ss = g.Squeeze(ss, g.ints(-2))  # (B,T,r)
                h = g.Mul(h, g.Add(g.MatMul(ss, p("ffn.s2")), p("ffn.s0")))
        return g.Add(x, g.MatMul(h, p("ffn.value.weight", True))), ffn_next

    def metadata(self) -> dict:
        c = self.cfg
        return {
            Key.N_LAYER: c.n_layer,
            Key.N_EMBD: c.n_embd,
            Key.HEAD_SIZE: c.head_size,
            Key.VOCAB: c.vocab,
            Key.VARIANT: c.variant.value,
            Key.CONFIG: json.dumps(c.to_dict()),
            Key.LOGITS: self.opts.logits.value,
            Key.PRECISION: json.dumps({"weights": "fp32", "activations": "fp32", "wkv": "fp32"}),
            Key.STATE_DTYPES: json.dumps({"x_tmix": "float32", "wkv": "float32", "x_cmix": "float32"}),
            Key.VERSION: __version__,
            Key.SOURCE_DIGEST: self.w.digest or "synthetic",
        }


def _last2(g: GraphBuilder, x: Value) -> Value:
    """x[:, -2:] (one position when T == 1)."""
    return g.Slice(x, g.ints(-2), g.ints(B.INT64_MAX), g.ints(1))


def build_model(weights: Weights, opts: BuildOptions = BuildOptions()) -> onnx.ModelProto:
    return _ModelBuilder(weights, opts).build()
