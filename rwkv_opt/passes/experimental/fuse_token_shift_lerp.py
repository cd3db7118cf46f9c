"""fuse_token_shift_lerp: the token-shift lerps that share (x, delta) become one broadcast.

    before (k >= min_group lerps sharing x and delta; RWKV-7's time mix has six: r w k v a g)
        y_i = Add(x, Mul(delta, mix_i))                    x, delta (B,T,C);  mix_i constant (C) or (1,1,C)
    after
        ys_KBTC = Add(x, Mul(delta, mix_K11C))             mix stacked to (k,1,1,C)
        y_i     = Gather(ys_KBTC, i, axis=0)               (or Split + Squeeze: Config.unstack)

    and with batch_projections, for the y_i that feed MatMul(y_i, W_i) with W_i constant (C, C)
    (RWKV-7's receptance, key, value), those members are stacked first and
        z_NBTC  = MatMul(Slice(ys_KBTC, 0:n, axis=0), W_N1CC)
        p_j     = Gather(z_NBTC, j, axis=0)                replaces MatMul(y_j, W_j)

Layout letters: K stacked lerps, N stacked projections, B batch, T time, C channels.
Constraints: commutative operand orders are all recognised; mix_i may be an initializer, a
Constant node or a Cast of either (as after a precision pass); the Mul must feed only its Add;
all members share dtype and C; x and delta need known, equal ranks (inferred when missing). A
lerp that has no partner (the channel mix's single x_k lerp) is left alone. Opset >= 13. The
export drops whatever no output needs (the replaced nodes, their weights, any other dead node).

Measured on the 0.1B shape, ORT CPU, 2 threads, on a shared 2-core host (benchmarks/fusion_speed.py;
whole-run paired ratios had a +-10% IQR there, so per-node profile kernel times of the rewritten
nodes decide): the stacked lerp costs +0.04 ms/token at T=1 and +0.6 to +4 ms at T=128, as ORT's
GatherSliceToSplitFusion turns the Gathers into Split + Squeeze, whose copies cost what the ten
saved Mul/Add did; batch_projections costs +0.2 ms at T=1 and +41 ms at T=128 (r/k/v MatMuls 72 ms vs
31 ms), as ORT prepacks only 2-D constant MatMul weights (GemmPackBFp32): the stacked (3,1,C,C) one
runs unpacked, MLAS packing its panels again on every call. So pipelines leave the rule off
(enabled_by_default = False); it is exact, and kept for providers where each kernel launch costs
more than its work (GPU decode: not measured).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rwkv_opt.passes.experimental._gs_util import (
    Rewriter,
    const_meta,
    const_value,
    elem_type,
    export_like,
    import_with_shapes,
    producer,
    scope_of,
)
from rwkv_opt.onnx_util import opset
from rwkv_opt.passes.base import Pass, PassConfig, PassResult, mark_applied, register

NAME = "fuse_token_shift_lerp"


class Unstack(str, enum.Enum):
    GATHER = "gather"  # one Gather(axis=0) per member
    SPLIT = "split"  # one Split(axis=0), then one Squeeze per member


@dataclass(frozen=True)
class Config(PassConfig):
    min_group: int = 2  # fewest lerps sharing (x, delta) worth stacking
    unstack: Unstack = Unstack.GATHER  # how members are taken back out of the stack
    batch_projections: bool = False  # also batch the square MatMuls reading members (r, k, v)

    def __post_init__(self):
        object.__setattr__(self, "unstack", Unstack(self.unstack))  # "split" from a target file or CLI
        if self.min_group < 2:
            raise ValueError(f"min_group must be >= 2 (a group of one has nothing to stack); got {self.min_group}")


@dataclass
class Lerp:
    add: gs.Node
    mix_C: np.ndarray
    proj: gs.Node | None = None  # a MatMul(y, W (C, C)) reading this lerp's output
    proj_W: np.ndarray | None = None


@dataclass
class LerpGroup:
    x: gs.Tensor
    delta: gs.Tensor
    members: list[Lerp] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return len(self.x.shape)


def _as_lerp(add: gs.Node) -> tuple[gs.Tensor, gs.Tensor, Lerp] | None:
    """(x, delta, lerp) if `add` is Add(x, Mul(delta, constant mix)) in any operand order."""
    if add.op != "Add" or len(add.inputs) != 2 or len(add.outputs) != 1:
        return None
    for x, prod in (add.inputs, add.inputs[::-1]):
        mul = producer(prod, "Mul")
        if mul is None or len(prod.outputs) != 1 or len(mul.inputs) != 2 or const_meta(x) is not None:
            continue
        for delta, m in (mul.inputs, mul.inputs[::-1]):
            meta = const_meta(m)
            per_channel = meta is not None and len(meta[0]) >= 1 and np.prod(meta[0]) == meta[0][-1] >= 2
            if per_channel and const_meta(delta) is None:
                return x, delta, Lerp(add, const_value(m).reshape(-1))
    return None


def find_groups(graph: gs.Graph, min_group: int) -> tuple[list[LerpGroup], str | None]:
    """Groups of >= min_group lerps sharing (x, delta), or ([], why none qualified)."""
    by_key: dict[tuple[str, str], LerpGroup] = {}
    for node in graph.nodes:
        found = _as_lerp(node)
        if found is None:
            continue
        x, delta, lerp = found
        by_key.setdefault((x.name, delta.name), LerpGroup(x, delta)).members.append(lerp)
    if not by_key:
        return [], "no Add(x, Mul(delta, constant mix)) lerp in the graph"
    groups, why = [], f"no {min_group} lerps share the same x and delta"
    for g in by_key.values():
        if len(g.members) < min_group:
            continue
        C, dtype = g.members[0].mix_C.size, g.members[0].mix_C.dtype
        if any(m.mix_C.size != C or m.mix_C.dtype != dtype for m in g.members):
            why = "lerps sharing x and delta differ in mix size or dtype"
        elif g.x.shape is None or g.delta.shape is None or len(g.x.shape) != len(g.delta.shape):
            why = "the rank of a lerp group's x or delta is unknown or differs"
        elif elem_type(g.x.dtype) != elem_type(dtype) or (isinstance(g.x.shape[-1], int) and g.x.shape[-1] != C):
            why = "a lerp group's mix does not match x's dtype or last axis"
        else:
            groups.append(g)
    return groups, None if groups else why


def _attach_projections(g: LerpGroup) -> list[Lerp]:
    """Mark members read by a square constant MatMul; return them (the ones to batch)."""
    C = g.members[0].mix_C.size
    for m in g.members:
        for mm in m.add.outputs[0].outputs:
            meta = const_meta(mm.inputs[1]) if mm.op == "MatMul" and mm.inputs[0] is m.add.outputs[0] else None
            if meta == ((C, C), elem_type(m.mix_C.dtype)):
                m.proj, m.proj_W = mm, const_value(mm.inputs[1])
                break
    return [m for m in g.members if m.proj is not None]


class _Rewriter(Rewriter):
    def __init__(self, graph: gs.Graph, cfg: Config):
        super().__init__(graph, NAME)
        self.cfg = cfg

    def node(self, scope: str, op: str, inputs, out_dtype, out_shape, **attrs) -> gs.Variable:
        name = self.name(scope, op)
        out = gs.Variable(f"{name}/output_0", dtype=out_dtype, shape=out_shape)
        self.graph.nodes.append(gs.Node(op, name, attrs, list(inputs), [out]))
        return out

    def unstack(self, scope: str, stacked: gs.Variable, outs: list[gs.Variable]) -> None:
        """Route slice i of `stacked` (axis 0) into the existing tensor outs[i]."""
        k = len(outs)
        if self.cfg.unstack is Unstack.SPLIT:
            parts = [gs.Variable(f"{self.name(scope, 'part')}", dtype=stacked.dtype) for _ in range(k)]
            sizes = self.const(scope, "split", np.ones(k, np.int64))
            self.graph.nodes.append(gs.Node("Split", self.name(scope, "Split"), {"axis": 0}, [stacked, sizes], parts))
            axes = self.const(scope, "axes", np.zeros(1, np.int64))
            for part, out in zip(parts, outs):
                self.graph.nodes.append(gs.Node("Squeeze", self.name(scope, "Squeeze"), {}, [part, axes], [out]))
            return
        for i, out in enumerate(outs):
            idx = self.const(scope, f"index_{i}", np.array(i, np.int64))
            self.graph.nodes.append(gs.Node("Gather", self.name(scope, "Gather"), {"axis": 0}, [stacked, idx], [out]))

    def group(self, g: LerpGroup) -> int:
        """Rewrite one group; return the number of projections batched."""
        batched = _attach_projections(g) if self.cfg.batch_projections else []
        if len(batched) < 2:
            batched = []
        members = batched + [m for m in g.members if m not in batched]
        scope, k, r = scope_of([m.add for m in members]), len(members), g.rank
        C, dtype = members[0].mix_C.size, members[0].mix_C.dtype
        out_shape = [k, *g.x.shape]
        mix = self.const(scope, "mix", np.stack([m.mix_C for m in members]).reshape([k] + [1] * (r - 1) + [C]))
        ys = self.node(scope, "Add", [g.x, self.node(scope, "Mul", [g.delta, mix], dtype, out_shape)], dtype, out_shape)
        outs = [m.add.outputs[0] for m in members]
        for m in members:
            m.add.outputs.clear()
        self.unstack(scope, ys, outs)
        if batched:
            self.projections(scope, ys, batched, k, r)
        return len(batched)

    def projections(self, scope: str, ys: gs.Variable, batched: list[Lerp], k: int, r: int) -> None:
        n, C = len(batched), batched[0].mix_C.size
        src = ys
        if n < k:
            src = self.node(
                scope,
                "Slice",
                [
                    ys,
                    *(
                        self.const(scope, s, np.array([v], np.int64))
                        for s, v in (("starts", 0), ("ends", n), ("axes", 0))
                    ),
                ],
                ys.dtype,
                [n, *ys.shape[1:]],
            )
        W = self.const(scope, "proj_W", np.stack([m.proj_W for m in batched]).reshape([n] + [1] * (r - 2) + [C, C]))
        z = self.node(scope, "MatMul", [src, W], ys.dtype, [n, *ys.shape[1:]])
        outs = [m.proj.outputs[0] for m in batched]
        for m in batched:
            m.proj.outputs.clear()
        self.unstack(scope, z, outs)


@register
class FuseTokenShiftLerp(Pass):
    name = NAME
    Config = Config
    description = "Stack the token-shift lerps sharing (x, delta) into one Mul+Add; optionally batch r/k/v."
    enabled_by_default: ClassVar[bool] = False  # neutral on ORT CPU at 0.1B; see the module docstring

    def requires(self, model: onnx.ModelProto) -> str | None:
        if opset(model) < 13:
            return f"needs opset >= 13 (Split/Squeeze/Slice with tensor inputs); the model has {opset(model)}"
        return find_groups(import_with_shapes(model), self.config.min_group)[1]

    def run(self, model: onnx.ModelProto) -> PassResult:
        graph = import_with_shapes(model)
        groups, why = find_groups(graph, self.config.min_group)
        if not groups:
            return PassResult(model, False, [why])
        rw = _Rewriter(graph, self.config)
        n_proj = sum(rw.group(g) for g in groups)
        graph.cleanup().toposort()
        out = export_like(graph, model)
        mark_applied(out, NAME)
        sizes = sorted({len(g.members) for g in groups})
        notes = [
            f"stacked {len(groups)} lerp group(s) of {'/'.join(map(str, sizes))} lerps ({self.config.unstack.value})"
        ]
        if self.config.batch_projections:
            notes.append(f"batched {n_proj} square projections")
        return PassResult(out, True, notes)
