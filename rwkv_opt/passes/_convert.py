"""The precision converter shared by fp16_mixed, fp16 and bf16.

Why our own converter: onnxconverter-common and ORT's float16 tools recurse into Scan bodies and
round-trip the WKV state through fp16 Cast pairs (docs/precision.md section 4). This one never enters a
subgraph: a node that owns subgraphs is opaque and runs in fp32, with every input it reads,
explicitly or captured from the outer scope, cast to fp32 just before it.

    before: every float tensor fp32
    after:  each node computes in the dtype its policy row picks, one Cast per (value, dtype) at
            the boundaries; initializers read only by low-precision nodes are stored in that dtype
            under their own (checkpoint-key) names

Policy, per node of the main graph in topological order (first row that matches wins):
    owns a subgraph (Scan, If, Loop)            -> fp32, opaque (its body is never touched)
    Cast, Constant, Shape, Size                 -> untouched (dtype-neutral or fixed by attribute)
    no float input or output                    -> untouched
    name under a kept scope (e.g. "/wkv/")      -> fp32
    op type kept fp32 by the policy             -> fp32
    data movement (Reshape, Slice, Concat, ...) -> follows its computed inputs: fp32 when all are
                                                   fp32, else low
    anything else                               -> low
  and a low node whose op type has no low kernel on the target EP (policy.low_ops) -> fp32.

The fp32 WKV state path it must keep is proved separately (passes/_state_path.py).
"""

from __future__ import annotations

import enum
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph import contract
from rwkv_opt.progress import phase, tick
from rwkv_opt.tensorstore import make_tensor, read_array
from rwkv_opt.onnx_util import captures, fresh_name, node_reads, rename_captures, subgraphs, value_types  # noqa: F401

FLOAT, FLOAT16, BFLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
LOW_TYPES = (FLOAT16, BFLOAT16)
TAG = {FLOAT: "fp32", FLOAT16: "fp16", BFLOAT16: "bf16"}
NP_NAME = {FLOAT: "float32", FLOAT16: "float16", BFLOAT16: "bfloat16"}

WKV_SCOPE = contract.scope_path(contract.Scope.WKV)  # "/wkv/": fp32 in every policy
# Ops that only move data: they run in whatever dtype their computed inputs already have.
FOLLOW_OPS = frozenset(
    {
        "Reshape",
        "Squeeze",
        "Unsqueeze",
        "Slice",
        "Concat",
        "Gather",
        "Transpose",
        "Identity",
        "Flatten",
        "Expand",
        "Split",
        "Tile",
    }
)
# Ops left exactly as they are: dtype-neutral (Shape, Size) or dtype fixed by an attribute.
KEEP_OPS = frozenset({"Cast", "Constant", "Shape", "Size"})
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})  # read their input's shape, never its values


class IoDtype(str, enum.Enum):
    """dtype of the token-shift state I/O (x_tmix_*, x_cmix_*) and of the logits `head`."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


@dataclass(frozen=True)
class Policy:
    low: int  # TensorProto.FLOAT16 or BFLOAT16
    fp32_scopes: tuple[str, ...]  # node-name substrings kept fp32, e.g. "/att/decay/"
    fp32_ops: frozenset[str] = frozenset()  # op types kept fp32 wherever they are
    low_ops: frozenset[str] | None = None  # when set: the only op types with a low kernel (EP table)
    io_low: bool = False  # state I/O and logits in `low` instead of fp32
    ln_stash_fp32: bool = False  # low LayerNormalization keeps fp32 statistics (stash_type=1)


@dataclass
class ConvertStats:
    low_nodes: Counter = field(default_factory=Counter)  # op type -> count
    fp32_nodes: Counter = field(default_factory=Counter)  # reason -> count
    casts: int = 0
    inits_converted: int = 0
    inits_copied: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def notes(self, low: int) -> list[str]:
        tag = TAG[low]
        kept = ", ".join(f"{k}: {v}" for k, v in sorted(self.fp32_nodes.items()))
        return [
            f"{sum(self.low_nodes.values())} nodes {tag} ({self.low_nodes.get('MatMul', 0)} MatMul), "
            f"{sum(self.fp32_nodes.values())} kept fp32 ({kept})",
            f"{self.casts} Cast nodes inserted",
            f"{self.inits_converted} initializers stored {tag} ({self.inits_copied} extra {tag} copies of shared "
            f"ones), weights {self.bytes_before / 2**20:.1f} -> {self.bytes_after / 2**20:.1f} MiB",
        ]


def n_layer_of(model: onnx.ModelProto) -> int:
    """Layers, counted from the contract's wkv_state_{i} inputs (metadata may be absent)."""
    return sum(1 for i in model.graph.input if re.fullmatch(r"wkv_state_\d+", i.name))


# ---- the converter ------------------------------------------------------------------------------
class _Converter:
    def __init__(self, model: onnx.ModelProto, policy: Policy):
        self.src, self.p = model, policy
        self.types = value_types(model)  # original (fp32 graph) types
        self.inits = {t.name: t for t in model.graph.initializer}
        self.cur: dict[str, int] = {}  # value -> dtype it has in the new graph
        self.nodes: list[onnx.NodeProto] = []
        self.casts: dict[tuple[str, int], str] = {}
        self.producer: dict[str, tuple[onnx.NodeProto, int]] = {}
        self.low_refs: list[tuple[onnx.NodeProto, int, str]] = []  # (node, input index, initializer)
        self.fp32_init_uses: Counter = Counter()
        self.stats = ConvertStats()
        self.names = {n.name for n in model.graph.node}

    def is_float(self, name: str) -> bool:
        return self.types.get(name) == FLOAT

    def io_names(self) -> tuple[set[str], set[str]]:
        ins, outs = set(), {contract.LOGITS}
        for i in range(n_layer_of(self.src)):
            a, _, f = contract.state_inputs(i)
            ins |= {a, f}
            a, _, f = contract.state_outputs(i)
            outs |= {a, f}
        return ins, outs

    # -- decisions --
    def mode(self, node: onnx.NodeProto) -> tuple[str, str]:
        """-> (mode, reason): mode in {'keep', 'fp32', 'low'}."""
        p = self.p
        if any(True for _ in subgraphs(node)):
            return "fp32", "subgraph"
        if node.op_type in KEEP_OPS:
            return "keep", ""
        if not any(self.is_float(v) for v in (*node.input, *node.output)):
            return "keep", ""
        for s in p.fp32_scopes:
            if s in node.name:
                return "fp32", f"scope {s}"
        if node.op_type in p.fp32_ops:
            return "fp32", f"op {node.op_type}"
        if node.op_type in FOLLOW_OPS:
            computed = [self.cur[i] for i in node.input if i and self.is_float(i) and i not in self.inits]
            if computed and all(t == FLOAT for t in computed):
                return "fp32", "follows fp32"
        if p.low_ops is not None and node.op_type not in p.low_ops:
            return "fp32", f"no {TAG[p.low]} kernel: {node.op_type}"
        return "low", ""

    # -- rewriting --
    def cast(self, value: str, to: int, consumer: str) -> str:
        """The value in dtype `to`: one Cast per (value, dtype), named in the scope of the first
        node that needs it, but outside any /wkv/ scope: everything under /wkv/ stays fp32."""
        key = (value, to)
        if key not in self.casts:
            scope = consumer.split(WKV_SCOPE)[0] if WKV_SCOPE in consumer else consumer.rsplit("/", 1)[0]
            name = self.unique(f"{scope}/Cast_{TAG[to]}")
            out = f"{name}/output_0"
            self.emit(helper.make_node("Cast", [value], [out], name=name, to=to))
            self.cur[out] = to
            self.casts[key] = out
            self.stats.casts += 1
        return self.casts[key]

    def unique(self, base: str) -> str:
        return fresh_name(base, self.names)

    def emit(self, node: onnx.NodeProto) -> None:
        self.nodes.append(node)
        for k, o in enumerate(node.output):
            self.producer[o] = (node, k)

    def convert_node(self, src: onnx.NodeProto) -> None:
        node = onnx.NodeProto()
        node.CopyFrom(src)
        mode, reason = self.mode(src)
        if mode == "keep":
            for i in node.input:
                if i in self.inits:
                    self.fp32_init_uses[i] += 1
            self.emit(node)
            for o in node.output:
                self.cur[o] = self.types.get(o, FLOAT)
            return
        want = FLOAT if mode == "fp32" else self.p.low
        for j, i in enumerate(node.input):
            if not i or not self.is_float(i):
                continue
            if i in self.inits:
                if want == FLOAT:
                    self.fp32_init_uses[i] += 1
                else:
                    self.low_refs.append((node, j, i))
            elif self.cur[i] != want:
                node.input[j] = self.cast(i, want, node.name)
        for c in captures(node):  # only opaque (fp32) nodes capture
            if c in self.inits:
                self.fp32_init_uses[c] += 1
            elif self.is_float(c) and self.cur[c] != FLOAT:
                new = self.cast(c, FLOAT, node.name)
                for sg in subgraphs(node):
                    rename_captures(sg, c, new)
        if mode == "low":
            self.stats.low_nodes[node.op_type] += 1
            if node.op_type == "LayerNormalization" and self.p.ln_stash_fp32:
                del_attr(node, "stash_type")
                node.attribute.append(helper.make_attribute("stash_type", 1))
        else:
            self.stats.fp32_nodes[reason] += 1
        self.emit(node)
        for o in node.output:
            self.cur[o] = want if (mode == "low" and self.is_float(o)) else self.types.get(o, FLOAT)

    def run(self) -> onnx.ModelProto:
        io_in, io_out = self.io_names()
        low_io = self.p.low if self.p.io_low else FLOAT
        for i in self.src.graph.input:
            self.cur[i.name] = low_io if i.name in io_in else i.type.tensor_type.elem_type
        for t in self.src.graph.initializer:
            self.cur[t.name] = t.data_type
        for n in self.src.graph.node:
            self.convert_node(n)
        self.fix_outputs({o: low_io for o in io_out})
        return self.assemble(io_in, low_io)

    def fix_outputs(self, want: dict[str, int]) -> None:
        """Cast graph outputs to their contract dtype (renaming the producer's output)."""
        for o in self.src.graph.output:
            to = want.get(o.name, o.type.tensor_type.elem_type)
            if self.cur.get(o.name) == to or not self.is_float(o.name):
                continue
            node, k = self.producer[o.name]
            internal = f"{node.name}/output_{k}"
            node.output[k] = internal
            for n in self.nodes:
                for j, i in enumerate(n.input):
                    if i == o.name:
                        n.input[j] = internal
                for sg in subgraphs(n):
                    rename_captures(sg, o.name, internal)
            self.producer[internal] = (node, k)
            self.cur[internal] = self.cur[o.name]
            name = self.unique(f"{node.name.rsplit('/', 1)[0]}/Cast_{TAG[to]}")
            self.emit(helper.make_node("Cast", [internal], [o.name], name=name, to=to))
            self.cur[o.name] = to
            self.stats.casts += 1

    def assemble(self, io_in: set[str], low_io: int) -> onnx.ModelProto:
        src, p = self.src, self.p
        out = onnx.ModelProto()
        for fd, value in src.ListFields():  # everything but the graph, whose weights are rebuilt below
            if fd.name == "graph":
                continue
            if fd.is_repeated:
                getattr(out, fd.name).extend(value)
            elif fd.message_type:
                getattr(out, fd.name).CopyFrom(value)
            else:
                setattr(out, fd.name, value)
        g = out.graph
        g.name, g.doc_string = src.graph.name, src.graph.doc_string
        for i in src.graph.input:
            vi = g.input.add()
            vi.CopyFrom(i)
            if i.name in io_in:
                vi.type.tensor_type.elem_type = low_io
        for o in src.graph.output:
            vo = g.output.add()
            vo.CopyFrom(o)
            vo.type.tensor_type.elem_type = self.cur[o.name]
        low_by_init = defaultdict(list)
        for node, j, name in self.low_refs:
            low_by_init[name].append((node, j))
        for k, t in enumerate(src.graph.initializer):
            tick(k)
            self.stats.bytes_before += _nbytes(t)
            refs = low_by_init.get(t.name)
            if refs and not self.fp32_init_uses[t.name]:
                new = _to_low(t, p.low, t.name)
                self.stats.inits_converted += 1
                g.initializer.append(new)
                self.stats.bytes_after += _nbytes(new)
                continue
            g.initializer.append(t)
            self.stats.bytes_after += _nbytes(t)
            if refs:  # shared by fp32 and low nodes: keep both
                copy = _to_low(t, p.low, f"{t.name}.{TAG[p.low]}")
                g.initializer.append(copy)
                self.stats.inits_converted += 1
                self.stats.inits_copied += 1
                self.stats.bytes_after += _nbytes(copy)
                for node, j in refs:
                    node.input[j] = copy.name
        g.node.extend(self.nodes)
        return out


def del_attr(node: onnx.NodeProto, name: str) -> None:
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)


def _to_low(t: onnx.TensorProto, low: int, name: str) -> onnx.TensorProto:
    arr = read_array(t)
    out = arr.astype(helper.tensor_dtype_to_np_dtype(low))
    if not np.isfinite(out).all() and np.isfinite(arr).all():
        raise RwkvOptError(
            f"initializer {t.name} has values beyond the {TAG[low]} range (max |x| = "
            f"{np.abs(arr).max():.3g}); keep it fp32 or use bf16."
        )
    return make_tensor(out, name)


def _nbytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def convert(model: onnx.ModelProto, policy: Policy) -> tuple[onnx.ModelProto, ConvertStats]:
    c = _Converter(model, policy)
    with phase("convert weights", len(model.graph.initializer), "tensors"):
        return c.run(), c.stats
