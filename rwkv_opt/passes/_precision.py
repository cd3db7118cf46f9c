"""The precision converter shared by fp16_mixed, fp16 and bf16, and the WKV state-path invariant.

Why our own converter: onnxconverter-common and ORT's float16 tools recurse into Scan bodies and
round-trip the WKV state through fp16 Cast pairs (architecture.md). This one never enters a
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

`state_path_violations` proves the invariant on any model (ours or another tool's): the WKV state
is fp32 from `wkv_state_i` to `wkv_next_i`, nothing under a `/wkv/` node sees a low-precision
tensor, and no WKV subgraph holds a low-precision Cast, initializer or value.
"""
from __future__ import annotations

import enum
import json
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
from rwkv_opt.passes.base import Pass, PassConfig, PassResult, fresh_name, get_meta, mark_applied, set_meta

FLOAT, FLOAT16, BFLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
LOW_TYPES = (FLOAT16, BFLOAT16)
TAG = {FLOAT: "fp32", FLOAT16: "fp16", BFLOAT16: "bf16"}
NP_NAME = {FLOAT: "float32", FLOAT16: "float16", BFLOAT16: "bfloat16"}

WKV_SCOPE = "/wkv/"
# Ops that only move data: they run in whatever dtype their computed inputs already have.
FOLLOW_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Slice", "Concat", "Gather", "Transpose",
                        "Identity", "Flatten", "Expand", "Split", "Tile"})
# Ops left exactly as they are: dtype-neutral (Shape, Size) or dtype fixed by an attribute.
KEEP_OPS = frozenset({"Cast", "Constant", "Shape", "Size"})
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})   # read their input's shape, never its values


class IoDtype(str, enum.Enum):
    """dtype of the token-shift state I/O (x_tmix_*, x_cmix_*) and of the logits `head`."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


@dataclass(frozen=True)
class Policy:
    low: int                                # TensorProto.FLOAT16 or BFLOAT16
    fp32_scopes: tuple[str, ...]            # node-name substrings kept fp32, e.g. "/att/decay/"
    fp32_ops: frozenset[str] = frozenset()  # op types kept fp32 wherever they are
    low_ops: frozenset[str] | None = None   # when set: the only op types with a low kernel (EP table)
    io_low: bool = False                    # state I/O and logits in `low` instead of fp32
    ln_stash_fp32: bool = False             # low LayerNormalization keeps fp32 statistics (stash_type=1)


@dataclass
class ConvertStats:
    low_nodes: Counter = field(default_factory=Counter)       # op type -> count
    fp32_nodes: Counter = field(default_factory=Counter)      # reason -> count
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


# ---- graph helpers ------------------------------------------------------------------------------
def subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads from enclosing scopes (captures), including through nested graphs."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    refs: set[str] = set()
    for n in graph.node:
        refs.update(i for i in n.input if i and i not in defined)
        for sg in subgraphs(n):
            refs.update(r for r in outer_refs(sg) if r not in defined)
        defined.update(n.output)
    refs.update(o.name for o in graph.output if o.name not in defined)
    return refs


def captures(node: onnx.NodeProto) -> list[str]:
    """Outer-scope values the node's subgraphs read without naming them as inputs."""
    caps = set()
    for sg in subgraphs(node):
        caps |= outer_refs(sg)
    return sorted(caps - set(node.input))


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus the outer-scope values its subgraphs capture."""
    return [i for i in node.input if i] + captures(node)


def _rename_captures(graph: onnx.GraphProto, old: str, new: str) -> None:
    if old in {i.name for i in graph.input} | {t.name for t in graph.initializer}:
        return  # shadowed here
    for n in graph.node:
        for j, i in enumerate(n.input):
            if i == old:
                n.input[j] = new
        for sg in subgraphs(n):
            _rename_captures(sg, old, new)
        if old in n.output:
            return
    for o in graph.output:
        if o.name == old:
            o.name = new


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """elem_type of every main-graph value, by ONNX type inference over a weightless skeleton
    (initializers become typed inputs, so a model of any size infers in milliseconds)."""
    g = onnx.GraphProto(name=model.graph.name)
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    have = {i.name for i in g.input}
    g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in model.graph.initializer if t.name not in have)
    skel = helper.make_model(g, opset_imports=model.opset_import, ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(skel)
    types = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def n_layer_of(model: onnx.ModelProto) -> int:
    """Layers, counted from the contract's wkv_state_{i} inputs (metadata may be absent)."""
    return sum(1 for i in model.graph.input if re.fullmatch(r"wkv_state_\d+", i.name))


# ---- the converter ------------------------------------------------------------------------------
class _Converter:
    def __init__(self, model: onnx.ModelProto, policy: Policy):
        self.src, self.p = model, policy
        self.types = value_types(model)                      # original (fp32 graph) types
        self.inits = {t.name: t for t in model.graph.initializer}
        self.cur: dict[str, int] = {}                         # value -> dtype it has in the new graph
        self.nodes: list[onnx.NodeProto] = []
        self.casts: dict[tuple[str, int], str] = {}
        self.producer: dict[str, tuple[onnx.NodeProto, int]] = {}
        self.low_refs: list[tuple[onnx.NodeProto, int, str]] = []   # (node, input index, initializer)
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
                    _rename_captures(sg, c, new)
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
                    _rename_captures(sg, o.name, internal)
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
        raise RwkvOptError(f"initializer {t.name} has values beyond the {TAG[low]} range (max |x| = "
                           f"{np.abs(arr).max():.3g}); keep it fp32 or use bf16.")
    return make_tensor(out, name)


def _nbytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def convert(model: onnx.ModelProto, policy: Policy) -> tuple[onnx.ModelProto, ConvertStats]:
    c = _Converter(model, policy)
    with phase("convert weights", len(model.graph.initializer), "tensors"):
        return c.run(), c.stats


# ---- the invariant ------------------------------------------------------------------------------
def _reach(graph: onnx.GraphProto, start: set[str], forward: bool) -> set[str]:
    """Values reachable from `start` along the dataflow (against it when not `forward`); one sweep
    suffices because ONNX keeps nodes in topological order."""
    seen = set(start)
    for n in (graph.node if forward else reversed(graph.node)):
        ins, outs = set(node_reads(n)), set(n.output)
        src, dst = (ins, outs) if forward else (outs, ins)
        if src & seen:
            seen |= dst
    return seen


def _low_inside(graph: onnx.GraphProto, where: str) -> list[str]:
    bad = []
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.type.tensor_type.elem_type in LOW_TYPES:
            bad.append(f"{where}: value {vi.name} is {TAG[vi.type.tensor_type.elem_type]}")
    for t in graph.initializer:
        if t.data_type in LOW_TYPES:
            bad.append(f"{where}: initializer {t.name} is {TAG[t.data_type]}")
    for n in graph.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i != FLOAT:
                bad.append(f"{where}: {n.name or n.op_type} casts to {TAG.get(a.i, a.i)}")
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in LOW_TYPES:
                bad.append(f"{where}: {n.name or n.op_type} holds a {TAG[a.t.data_type]} constant")
        for sg in subgraphs(n):
            bad += _low_inside(sg, f"{where}/{n.name or n.op_type}")
    return bad


def state_path_violations(model: onnx.ModelProto) -> list[str]:
    """Why the WKV state path is not fp32 end to end ([] when it is); walks subgraphs too."""
    g = model.graph
    types = value_types(model)
    decl_in = {i.name: i.type.tensor_type.elem_type for i in g.input}
    decl_out = {o.name: o.type.tensor_type.elem_type for o in g.output}
    bad = []
    n = n_layer_of(model)
    if n == 0:
        return ["no wkv_state_i inputs: not an rwkv-opt model"]
    for i in range(n):
        s_in, s_out = contract.state_inputs(i)[1], contract.state_outputs(i)[1]
        if decl_in.get(s_in) != FLOAT:
            bad.append(f"input {s_in} is not float32")
        if decl_out.get(s_out) != FLOAT:
            bad.append(f"output {s_out} is not float32")
        path = _reach(g, {s_in}, True) & _reach(g, {s_out}, False)
        if s_out not in path:
            bad.append(f"no path from {s_in} to {s_out}")
        for nd in g.node:
            if not (set(node_reads(nd)) & path and set(nd.output) & path):
                continue
            if nd.op_type == "Cast" and any(a.name == "to" and a.i != FLOAT for a in nd.attribute):
                bad.append(f"layer {i}: {nd.name} casts the WKV state away from fp32")
            bad += [f"layer {i}: state value {o} is {TAG.get(types.get(o), types.get(o))}"
                    for o in nd.output if o in path and types.get(o) != FLOAT]
    for nd in g.node:
        if WKV_SCOPE not in nd.name or nd.op_type in SHAPE_ONLY_OPS:   # reading a shape reads no values
            continue
        for v in [*node_reads(nd), *nd.output]:
            if types.get(v) in LOW_TYPES:
                bad.append(f"{nd.name} reads or writes {v} in {TAG[types[v]]}")
        for sg in subgraphs(nd):
            bad += _low_inside(sg, nd.name)
    return bad


# ---- the passes' shared shape -------------------------------------------------------------------
def model_precision(model: onnx.ModelProto) -> dict:
    try:
        return json.loads(get_meta(model, "rwkv_opt.precision", "{}"))
    except json.JSONDecodeError:
        return {}


def coerce_enum(cfg, name: str, enum_type) -> None:
    """Frozen configs accept the enum's value (targets and the CLI pass strings)."""
    value = getattr(cfg, name)
    try:
        object.__setattr__(cfg, name, enum_type(value))
    except ValueError:
        raise RwkvOptError(f"{name} '{value}' is not valid; choose one of: "
                           f"{', '.join(e.value for e in enum_type)}.") from None


class PrecisionPass(Pass):
    """A pass that converts an fp32 rwkv-opt model by a `Policy`; subclasses say which."""

    mode_name: str = ""             # the rwkv_opt.precision "mode", e.g. "fp16-mixed"
    allowed_io: tuple[IoDtype, ...] = (IoDtype.FP32,)

    def policy(self, model: onnx.ModelProto) -> Policy:
        raise NotImplementedError

    def precision_meta(self, policy: Policy) -> dict:
        raise NotImplementedError

    def check(self, model: onnx.ModelProto) -> str | None:
        if get_meta(model, "rwkv_opt.config") is None:
            return "model has no rwkv-opt metadata; build it with rwkv_opt.graph.model.build_model or `rwkv-opt build`"
        if self.config.io_dtype not in self.allowed_io:
            return (f"io_dtype {self.config.io_dtype.value} is not valid for {self.name}; "
                    f"choose {' or '.join(d.value for d in self.allowed_io)}")
        prec = model_precision(model)
        mode = prec.get("mode") or (prec.get("weights") if prec.get("weights") not in (None, "fp32") else None)
        if mode:
            return f"model is already {mode}; {self.name} converts fp32 models only"
        low = [t.name for t in model.graph.initializer if t.data_type in LOW_TYPES]
        if low:
            return (f"model already holds low-precision initializers (e.g. {low[0]}); "
                    f"{self.name} converts fp32 models only")
        return None

    def run(self, model: onnx.ModelProto) -> PassResult:
        policy = self.policy(model)
        out, stats = convert(model, policy)
        bad = state_path_violations(out)
        if bad:
            raise RwkvOptError(f"{self.name} broke the fp32 WKV state path ({bad[0]}); this is a bug in rwkv-opt.")
        io = NP_NAME[policy.low] if policy.io_low else "float32"
        set_meta(out, "rwkv_opt.precision", json.dumps(self.precision_meta(policy)))
        set_meta(out, "rwkv_opt.state_dtypes", json.dumps({"x_tmix": io, "wkv": "float32", "x_cmix": io}))
        mark_applied(out, self.name)
        return PassResult(out, True, stats.notes(policy.low))


@dataclass(frozen=True)
class PrecisionConfig(PassConfig):
    io_dtype: IoDtype = IoDtype.FP32  # dtype of x_tmix/x_cmix state I/O and logits `head`

    def __post_init__(self):
        coerce_enum(self, "io_dtype", IoDtype)


MIXED_SCOPES = ("/wkv/", "/att/decay/", "/att/normalize/", "/att/ln_x/")
