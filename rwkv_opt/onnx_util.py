"""ONNX graph utilities shared by the graph builder, the passes and the tools: opsets, traversal
(subgraphs and what they capture), dead-code removal, fresh names, and shape inference over a
model's weightless structure.

Traversal rule used throughout: a node owns subgraphs through GRAPH and GRAPHS attributes (Scan,
If, Loop), and a subgraph may read names of any enclosing scope without listing them as inputs
(captures); `node_reads` counts those as reads of the node that owns the subgraph.
"""

from __future__ import annotations

from typing import Iterator

import onnx
from onnx import helper

DEFAULT_DOMAINS = ("", "ai.onnx")


def opset(model: onnx.ModelProto, domain: str = "") -> int:
    """The model's opset version for `domain` ("" = the default ONNX domain); 0 when not imported."""
    domains = DEFAULT_DOMAINS if domain in DEFAULT_DOMAINS else (domain,)
    return next((o.version for o in model.opset_import if o.domain in domains), 0)


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs a node owns (Scan/Loop bodies, If branches)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def walk(graph: onnx.GraphProto) -> Iterator[tuple[onnx.NodeProto, onnx.GraphProto]]:
    """Every node of `graph` and of its subgraphs, depth first, with the graph that holds it."""
    for n in graph.node:
        yield n, graph
        for sg in subgraphs(n):
            yield from walk(sg)


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph under it."""
    yield graph
    for n in graph.node:
        for sg in subgraphs(n):
            yield from all_graphs(sg)


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of `node`'s attribute `name`, or `default` when it has none."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Value name -> the node of `graph` (top level) that makes it."""
    return {o: n for n in graph.node for o in n.output}


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
    caps: set[str] = set()
    for sg in subgraphs(node):
        caps |= outer_refs(sg)
    return sorted(caps - set(node.input))


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus the outer-scope values its subgraphs capture."""
    return [i for i in node.input if i] + captures(node)


def rename_captures(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename the outer-scope value `old` to `new` wherever `graph` (recursively) reads it."""
    if old in {i.name for i in graph.input} | {t.name for t in graph.initializer}:
        return  # shadowed here
    for n in graph.node:
        for j, i in enumerate(n.input):
            if i == old:
                n.input[j] = new
        for sg in subgraphs(n):
            rename_captures(sg, old, new)
        if old in n.output:
            return
    for o in graph.output:
        if o.name == old:
            o.name = new


def names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name `graph` reads: node inputs, graph outputs, and the same inside subgraphs
    (which may capture outer-scope names)."""
    out = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in graph.node:
        for sg in subgraphs(n):
            out |= names_read(sg)
    return out


def drop_dead(graph: onnx.GraphProto) -> int:
    """Remove nodes none of whose outputs is read (ONNX ops are pure), until none is left; then,
    if any went, the initializers nothing reads any more; and always the value_info of tensors
    nothing produces. -> number of nodes removed."""
    removed, read = 0, names_read(graph)
    while dead := [n for n in graph.node if not any(o in read for o in n.output)]:
        for n in dead:
            graph.node.remove(n)
        removed += len(dead)
        read = names_read(graph)
    inputs = {i.name for i in graph.input}  # an input's default value stays
    if removed:
        for t in [t for t in graph.initializer if t.name not in read and t.name not in inputs]:
            graph.initializer.remove(t)
    made = {o for n in graph.node for o in n.output} | inputs
    for vi in [vi for vi in graph.value_info if vi.name not in made]:
        graph.value_info.remove(vi)
    return removed


def fresh_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first not in `taken`, which then holds it."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def weightless(model: onnx.ModelProto, keep_up_to: int = 0) -> onnx.ModelProto:
    """The model's structure with every initializer of more than `keep_up_to` elements turned into
    a typed graph input: what shape inference and checks need, at no weight copies."""
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    have = {i.name for i in g.input}
    for t in model.graph.initializer:
        if numel(t) <= keep_up_to:
            g.initializer.append(t)
        elif t.name not in have:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def inferred_value_info(model: onnx.ModelProto, keep_up_to: int = 0) -> list[onnx.ValueInfoProto]:
    """Type and shape of every main-graph value, by ONNX inference over the weightless structure
    (small constants under `keep_up_to` elements stay, so shapes that depend on them resolve)."""
    inferred = onnx.shape_inference.infer_shapes(weightless(model, keep_up_to))
    return [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """elem_type of every main-graph value (a model of any size infers in milliseconds)."""
    return {
        vi.name: vi.type.tensor_type.elem_type for vi in inferred_value_info(model) if vi.type.HasField("tensor_type")
    }
