"""Shared onnx-graphsurgeon plumbing for the pattern-based fusion rules (fuse_*.py).

Rules find their patterns by structure (op types, wiring, which operands are constant), never by
node or tensor names, so they work on graphs that a precision pass, onnxsim or a re-serialisation
touched. Names of new nodes are only derived from the matched nodes' scope, for readers.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx
from onnx_graphsurgeon.ir.tensor import LazyValues

from rwkv_opt.onnx_util import fresh_name, inferred_value_info

# Initializers above this many elements become typed graph inputs for shape inference, so that
# inferring ranks costs no weight copies (shape inference needs only their shapes).
_SHAPE_ONLY_ABOVE = 4096


def import_with_shapes(model: onnx.ModelProto) -> gs.Graph:
    """The model as a gs.Graph whose intermediate tensors carry inferred dtypes and shapes."""
    graph = gs.import_onnx(model)
    known = _infer_value_types(model)
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name in known and (t.shape is None or t.dtype is None):
            t.dtype, t.shape = known[t.name]
    return graph


def _infer_value_types(model: onnx.ModelProto) -> dict[str, tuple]:
    out = {}
    for vi in inferred_value_info(model, keep_up_to=_SHAPE_ONLY_ABOVE):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out[vi.name] = (helper.tensor_dtype_to_np_dtype(tt.elem_type), dims)
    return out


def export_like(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph`, keeping the original model's ir_version, opsets, producer and metadata."""
    model = gs.export_onnx(graph, opset_imports=list(original.opset_import))
    model.ir_version = original.ir_version
    model.producer_name, model.producer_version = original.producer_name, original.producer_version
    model.metadata_props.extend(original.metadata_props)
    return model


def const_meta(t: gs.Tensor) -> tuple[tuple[int, ...], int] | None:
    """(shape, onnx elem type) if `t` is constant (see const_value), read without loading its data."""
    if isinstance(t, gs.Constant):
        return tuple(t.shape), elem_type(t.dtype)
    if len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
        return const_meta(node.attrs["value"])
    if node.op == "Cast":
        src = const_meta(node.inputs[0])
        return None if src is None else (src[0], node.attrs["to"])
    return None


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of `t` if it is constant: an initializer, a Constant node, or a Cast of either.

    Reads the TensorProto directly: gs's `.values` would cache a float32 copy of a bf16 tensor and
    export that instead. bf16 comes back as ml_dtypes.bfloat16.
    """
    if isinstance(t, gs.Constant):
        v = t._values
        return numpy_helper.to_array(v.tensor) if isinstance(v, LazyValues) else np.asarray(v)
    meta = const_meta(t)
    if meta is None:
        return None
    node = t.inputs[0]
    if node.op == "Constant":
        return const_value(node.attrs["value"])
    return const_value(node.inputs[0]).astype(helper.tensor_dtype_to_np_dtype(node.attrs["to"]))


def constant(name: str, array: np.ndarray) -> gs.Constant:
    """A gs.Constant backed by a TensorProto, so that every dtype onnx knows (bf16 too) exports as is."""
    return gs.Constant(name, LazyValues(numpy_helper.from_array(np.array(array, order="C"), name)))


def elem_type(dtype) -> int:
    """The onnx elem type of a gs dtype (a numpy dtype, an ml_dtypes dtype or already an int)."""
    return dtype_to_onnx(dtype)


def producer(t: gs.Tensor, op: str) -> gs.Node | None:
    """The node of type `op` that produces `t`, or None."""
    return t.inputs[0] if len(t.inputs) == 1 and t.inputs[0].op == op else None


def scope_of(nodes) -> str:
    """The longest common '/a/b/' scope of the nodes' names ('' when they are unnamed)."""
    prefix = os.path.commonprefix([n.name or "" for n in nodes])
    return prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""


class Namer:
    """Unique node and tensor names for a rewrite, derived from the matched scope."""

    def __init__(self, graph: gs.Graph, rule: str):
        self.rule = rule
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes}

    def __call__(self, scope: str, leaf: str) -> str:
        return fresh_name(f"{scope or '/'}{self.rule}/{leaf}", self.taken)


class Rewriter:
    """Base of a rule's rewriter: the graph, a Namer, and constants (int64 ones shared by value)."""

    def __init__(self, graph: gs.Graph, rule: str):
        self.graph, self.name = graph, Namer(graph, rule)
        self._ints: dict[tuple, gs.Constant] = {}

    def const(self, scope: str, leaf: str, value) -> gs.Constant:
        value = np.asarray(value)
        if value.dtype != np.int64:
            return constant(self.name(scope, leaf), value)
        key = (value.shape, value.tobytes())  # indices, axes, sizes: one initializer per distinct value
        if key not in self._ints:
            self._ints[key] = constant(self.name("/", leaf), value)
        return self._ints[key]
