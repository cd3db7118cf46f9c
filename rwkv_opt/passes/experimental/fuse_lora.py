"""fuse_lora: LoRA down-projections share one MatMul where their inputs allow it.

A LoRA down-projection is h = MatMul(x, A), A constant (C, D) with D < C, whose output reaches
an up-projection (MatMul, or Gemm as onnxsim writes MatMul+Add) with a constant (D, .) weight,
through at most one activation (Tanh, Sigmoid, Relu) and one Reshape (Shape reads aside).

concat_siblings: constant-weight MatMuls reading the same x, at least one a LoRA down-projection
(RWKV-7: value and v1 both read x_v)
    before   h_j = MatMul(x, A_j)                          A_j (C, D_j)
    after    h_j = Split(MatMul(x, A_cat), [D_1..D_n], axis=-1)[j]     A_cat (C, sum D_j)

batch_stacked: LoRA down-projections of equal D whose inputs are slices of one stacked tensor, as
fuse_token_shift_lerp writes them (RWKV-7: w1 and a1 read x_w and x_a, both D = Dw = Da)
    before   h_j = MatMul(Gather(s_KBTC, i_j, axis=0), A_j)
    after    h_NBTD = MatMul(Slice(s_KBTC, i_1..i_n) or Gather(s_KBTC, [i_1..i_n]), A_N1CD)
             h_j    = Gather(h_NBTD, j, axis=0)

Constraints: weights constant (initializer, Constant, or a Cast of either) and of one dtype; the
batched form needs the stacked tensor's rank (inferred when missing) and scalar Gather indices
(fuse_token_shift_lerp's Gather form, not its Split form). Batching all of a/w/g/v would need
their widths (64/64/32/128 at 0.1B) padded to one, reading ~0.7 MB more weights per layer and
token than the three saved dispatches are worth, so it is not offered.

Measured on the 0.1B shape, ORT CPU, 2 threads (benchmarks/fusion_speed.py, per-node profile
kernel times of the rewritten nodes): concat_siblings saves 0.07 ms/token at T=1 and 0.4 ms at
T=128, under 0.3% and inside the whole-run noise (x0.995-1.006); batch_stacked after the lerp rule
costs +2.3 ms at T=128 (its stacked weights are not prepacked). Nothing measured faster, so
pipelines leave the rule off (enabled_by_default = False); the rewrite is exact.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rwkv_opt.passes.experimental._gs_util import Rewriter, const_meta, const_value, export_like, import_with_shapes
from rwkv_opt.onnx_util import opset
from rwkv_opt.passes.base import Pass, PassConfig, PassResult, mark_applied, register

NAME = "fuse_lora"
_ACTIVATIONS = ("Tanh", "Sigmoid", "Relu")


@dataclass(frozen=True)
class Config(PassConfig):
    concat_siblings: bool = True  # one MatMul for constant MatMuls (>= 1 a LoRA down) reading one tensor
    batch_stacked: bool = True  # one batched MatMul for equal-D LoRA downs reading one stacked tensor


def _weight(mm: gs.Node) -> tuple[tuple[int, int], int] | None:
    """(shape, elem type) of a MatMul's constant 2-D right operand, or None (its data is not read)."""
    if mm.op != "MatMul" or len(mm.inputs) != 2 or not mm.outputs:  # no outputs: already rewritten
        return None
    meta = const_meta(mm.inputs[1])
    return meta if meta is not None and len(meta[0]) == 2 else None


def _is_lora_down(mm: gs.Node) -> bool:
    W = _weight(mm)
    if W is None or W[0][1] >= W[0][0]:
        return False
    t, seen = mm.outputs[0], set()
    while len(users := [c for c in t.outputs if c.op != "Shape"]) == 1:  # onnxsim's Gemm adds Shape reads
        nxt = users[0]
        kind = "activation" if nxt.op in _ACTIVATIONS else nxt.op
        if kind in ("activation", "Reshape") and kind not in seen and nxt.inputs[0] is t:
            seen.add(kind)
            t = nxt.outputs[0]
            continue
        return _is_up_projection(nxt, t, W[0][1])
    return False


def _is_up_projection(node: gs.Node, h: gs.Tensor, D: int) -> bool:
    if node.op not in ("MatMul", "Gemm") or node.inputs[0] is not h or node.attrs.get("transA", 0):
        return False
    up = const_meta(node.inputs[1])
    if up is None or len(up[0]) != 2:
        return False
    return up[0][1 if node.attrs.get("transB", 0) else 0] == D


def find_sibling_sets(graph: gs.Graph) -> list[list[gs.Node]]:
    """Sets of >= 2 constant-weight MatMuls reading one tensor, at least one a LoRA down-projection."""
    by_input: dict[str, list[gs.Node]] = defaultdict(list)
    for n in graph.nodes:
        if _weight(n) is not None:
            by_input[n.inputs[0].name].append(n)
    sets = []
    for mms in by_input.values():
        (C, _), dt = _weight(mms[0])
        same = [m for m in mms if _weight(m)[0][0] == C and _weight(m)[1] == dt]
        if len(same) >= 2 and any(_is_lora_down(m) for m in same):
            sets.append(same)
    return sets


def _stack_slice(t: gs.Tensor) -> tuple[gs.Tensor, int] | None:
    """(s, i) if t = Gather(s, scalar constant i, axis=0) with s of known rank."""
    if len(t.inputs) != 1 or t.inputs[0].op != "Gather" or t.inputs[0].attrs.get("axis", 0) != 0:
        return None
    g = t.inputs[0]
    idx = const_value(g.inputs[1])
    if idx is None or idx.ndim != 0 or g.inputs[0].shape is None:
        return None
    return g.inputs[0], int(idx)


def find_batches(graph: gs.Graph) -> list[tuple[gs.Tensor, list[tuple[int, gs.Node]]]]:
    """(stacked tensor, [(index, LoRA down MatMul)]) with >= 2 downs of equal width and dtype."""
    groups: dict[tuple, list] = defaultdict(list)
    stacks = {}
    for n in graph.nodes:
        if not _is_lora_down(n):
            continue
        found = _stack_slice(n.inputs[0])
        if found is None:
            continue
        s, i = found
        stacks[s.name] = s
        groups[(s.name, *_weight(n))].append((i, n))
    out = []
    for (sname, _, _), members in groups.items():
        members = sorted({i: n for i, n in members}.items())  # one down per stack slot
        if len(members) >= 2:
            out.append((stacks[sname], members))
    return out


class _Rewriter(Rewriter):
    def __init__(self, graph: gs.Graph):
        super().__init__(graph, NAME)

    def _scope(self, node: gs.Node) -> str:
        return node.name[: node.name.rfind("/") + 1] if "/" in (node.name or "") else ""

    def add(self, scope: str, op: str, inputs, outputs, **attrs) -> None:
        self.graph.nodes.append(gs.Node(op, self.name(scope, op), attrs, list(inputs), list(outputs)))

    def var(self, scope: str, leaf: str, dtype, shape=None) -> gs.Variable:
        return gs.Variable(self.name(scope, leaf), dtype=dtype, shape=shape)

    def concat(self, mms: list[gs.Node]) -> None:
        Ws = [const_value(m.inputs[1]) for m in mms]
        scope = self._scope(mms[0])
        x, outs = mms[0].inputs[0], [m.outputs[0] for m in mms]
        for m in mms:
            m.outputs.clear()
        shape = None if outs[0].shape is None else [*outs[0].shape[:-1], sum(W.shape[1] for W in Ws)]
        h = self.var(scope, "MatMul/output_0", outs[0].dtype, shape)
        self.add(scope, "MatMul", [x, self.const(scope, "A_cat", np.concatenate(Ws, axis=1))], [h])
        self.add(scope, "Split", [h, self.const(scope, "split", [W.shape[1] for W in Ws])], outs, axis=-1)

    def batch(self, s: gs.Tensor, members: list[tuple[int, gs.Node]]) -> None:
        idx, mms = [i for i, _ in members], [m for _, m in members]
        Ws = [const_value(m.inputs[1]) for m in mms]
        scope, n, r = self._scope(mms[0]), len(mms), len(s.shape)
        C, D = Ws[0].shape
        src = self.var(scope, "slices", s.dtype, [n, *s.shape[1:]])
        if idx == list(range(idx[0], idx[0] + n)):
            bounds = [self.const(scope, k, [v]) for k, v in (("starts", idx[0]), ("ends", idx[0] + n), ("axes", 0))]
            self.add(scope, "Slice", [s, *bounds], [src])
        else:
            self.add(scope, "Gather", [s, self.const(scope, "indices", idx)], [src], axis=0)
        A = self.const(scope, "A_stack", np.stack(Ws).reshape([n] + [1] * (r - 3) + [C, D]))
        h = self.var(scope, "MatMul/output_0", s.dtype, [n, *s.shape[1:-1], D])
        self.add(scope, "MatMul", [src, A], [h])
        outs = [m.outputs[0] for m in mms]
        for m in mms:
            m.outputs.clear()
        for j, out in enumerate(outs):
            self.add(scope, "Gather", [h, self.const(scope, f"index_{j}", np.array(j, np.int64))], [out], axis=0)


@register
class FuseLora(Pass):
    name = NAME
    Config = Config
    description = "Concatenate LoRA down-projections reading one tensor; batch equal-width ones over a stack."
    enabled_by_default: ClassVar[bool] = False  # measured slower or equal on the 0.1B shape

    def _find(self, graph: gs.Graph):
        sets = find_sibling_sets(graph) if self.config.concat_siblings else []
        batches = find_batches(graph) if self.config.batch_stacked else []
        return sets, batches

    def requires(self, model: onnx.ModelProto) -> str | None:
        if opset(model) < 13:
            return f"needs opset >= 13 (Split and Slice with tensor inputs); the model has {opset(model)}"
        if not (self.config.concat_siblings or self.config.batch_stacked):
            return "both concat_siblings and batch_stacked are off"
        sets, batches = self._find(import_with_shapes(model))
        if sets or batches:
            return None
        why = "no LoRA down-projection shares its input with another constant MatMul"
        if self.config.batch_stacked:
            why += ", and none reads a stacked tensor's slice alongside an equal-width one"
        return why

    def run(self, model: onnx.ModelProto) -> PassResult:
        graph = import_with_shapes(model)
        sets, batches = self._find(graph)
        if not (sets or batches):
            return PassResult(model, False, ["no LoRA down-projections to fuse"])
        rw = _Rewriter(graph)
        # Batch first: a down that joins a batch no longer reads x directly, so sets are re-found.
        for s, members in batches:
            rw.batch(s, members)
        sets = find_sibling_sets(graph) if self.config.concat_siblings else []
        for mms in sets:
            rw.concat(mms)
        graph.cleanup().toposort()
        out = export_like(graph, model)
        mark_applied(out, NAME)
        return PassResult(
            out, True, [f"concatenated {len(sets)} sibling set(s), batched {len(batches)} stack group(s)"]
        )
