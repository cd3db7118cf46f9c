"""The fp32 WKV state-path invariant, proved on any model (ours or another tool's).

`state_path_violations` proves the invariant on any model (ours or another tool's): the WKV state
is fp32 from `wkv_state_i` to `wkv_next_i`, nothing under a `/wkv/` node sees a low-precision
tensor, and no WKV subgraph holds a low-precision Cast, initializer or value.
"""

from __future__ import annotations

import onnx

from rwkv_opt.graph import contract
from rwkv_opt.onnx_util import node_reads, subgraphs, value_types
from rwkv_opt.passes._convert import FLOAT, LOW_TYPES, SHAPE_ONLY_OPS, TAG, WKV_SCOPE, n_layer_of


def _reach(graph: onnx.GraphProto, start: set[str], forward: bool) -> set[str]:
    """Values reachable from `start` along the dataflow (against it when not `forward`); one sweep
    suffices because ONNX keeps nodes in topological order."""
    seen = set(start)
    for n in graph.node if forward else reversed(graph.node):
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
            bad += [
                f"layer {i}: state value {o} is {TAG.get(types.get(o), types.get(o))}"
                for o in nd.output
                if o in path and types.get(o) != FLOAT
            ]
    for nd in g.node:
        if WKV_SCOPE not in nd.name or nd.op_type in SHAPE_ONLY_OPS:  # reading a shape reads no values
            continue
        for v in [*node_reads(nd), *nd.output]:
            if types.get(v) in LOW_TYPES:
                bad.append(f"{nd.name} reads or writes {v} in {TAG[types[v]]}")
        for sg in subgraphs(nd):
            bad += _low_inside(sg, nd.name)
    return bad
