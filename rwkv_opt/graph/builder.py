"""A small value-returning ONNX graph builder with hierarchical node names.

    g = GraphBuilder("rwkv7")
    with g.scope("blocks.3"), g.scope("att"):
        y = g.MatMul(x, g.weight("blocks.3.att.receptance.weight_T", R_T))   # node /blocks.3/att/MatMul

Every op call returns the Value(s) it produced; names are derived from the scope, so graphs
are wired with values, never with hand-typed strings. Nodes are named `/scope/.../Op[_n]`
and their outputs `/scope/.../Op[_n]/output_k`.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rwkv_opt.tensorstore import make_tensor

DEFAULT_OPSET = 21


class Value(str):
    """A tensor name produced by the builder (a str, so it drops into onnx.helper calls)."""


class GraphBuilder:
    def __init__(self, name: str = "graph", opset: int = DEFAULT_OPSET):
        self.name = name
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self._scope: list[str] = []
        self._used = Counter()
        self._consts: dict[tuple, Value] = {}

    # ---- naming ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str):
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _unique(self, base: str) -> str:
        n = self._used[base]
        self._used[base] += 1
        return base if n == 0 else f"{base}_{n}"

    def path(self, leaf: str) -> str:
        return "/" + "/".join([*self._scope, leaf])

    # ---- graph inputs, outputs, constants ---------------------------------------------------
    def input(self, name: str, elem_type: int, shape) -> Value:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return Value(name)

    def output(self, value: str, name: str, elem_type: int, shape) -> Value:
        """Expose `value` as graph output `name` (renaming its producer's output in place)."""
        for node in self.nodes:
            for j, o in enumerate(node.output):
                if o == value:
                    node.output[j] = name
        for node in self.nodes:
            for j, i in enumerate(node.input):
                if i == value:
                    node.input[j] = name
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return Value(name)

    def weight(self, name: str, array: np.ndarray, inline: bool = False) -> Value:
        """A named initializer (model weights keep their checkpoint-derived names). Under an active
        TensorStore it is written out at once unless `inline` (constants, subgraph tensors)."""
        if name in self.initializers:
            raise ValueError(f"initializer {name} defined twice")
        array = np.asarray(array)  # (np.ascontiguousarray would turn a 0-D scalar into shape (1,))
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        self.initializers[name] = numpy_helper.from_array(array, name) if inline else make_tensor(array, name)
        return Value(name)

    def const(self, value, dtype=np.float32) -> Value:
        """A small constant initializer, shared between identical uses."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self._unique(f"const_{arr.dtype.name}_{'x'.join(map(str, arr.shape)) or 's'}")
            self._consts[key] = self.weight(name, arr, inline=True)
        return self._consts[key]

    def ints(self, *values) -> Value:
        return self.const(list(values), np.int64)

    # ---- ops ----------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs, outputs: int = 1, name: str | None = None, domain: str = "", **attrs):
        node_name = self._unique(self.path(name or op_type))
        outs = [Value(f"{node_name}/output_{k}") for k in range(outputs)]
        ins = ["" if i is None else i for i in inputs]
        self.nodes.append(helper.make_node(op_type, ins, outs, name=node_name, domain=domain, **attrs))
        return outs[0] if outputs == 1 else tuple(outs)

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **kw: self.op(op_type, *inputs, **kw)

    # ---- assembly -----------------------------------------------------------------------------
    def graph(self) -> onnx.GraphProto:
        return helper.make_graph(
            self.nodes,
            self.name,
            self.inputs,
            self.outputs,
            initializer=list(self.initializers.values()),
            value_info=self.value_info,
        )

    def model(self, metadata: dict | None = None, ir_version: int = 10) -> onnx.ModelProto:
        """The ModelProto. Initializers are MOVED into it one at a time (the builder is left without
        them): protobuf copies on every assignment, so building the graph with them and then the
        model would hold three copies of the weights at once."""
        g = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, value_info=self.value_info)
        m = helper.make_model(
            g, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="rwkv-opt", ir_version=ir_version
        )
        del g
        for name in list(self.initializers):
            m.graph.initializer.append(self.initializers.pop(name))
        self._consts.clear()
        for k, v in (metadata or {}).items():
            m.metadata_props.add(key=k, value=str(v))
        return m


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
