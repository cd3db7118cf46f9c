"""The decode path: an artifact's graph specialised to one token per call (T == 1), and the one graph
`runtime.Session(decode_graph=True)` runs, which takes that path for T == 1 and the artifact's own
graph otherwise. Opt-in: on ORT's CPU EP (0.1B, Intel Xeon, 2 threads) it measured 0.98-1.00x
model.onnx's decode time in separate processes (reports/decode.md), the ~130 nodes it removes being
worth about as much as the top-level If costs; a GPU EP, where each per-layer If may sync the device,
is where it is meant to be measured next.

    tokens ─ Shape[1] == 1 ─ If ─ then: decode_graph(model)   (no WKV If, no token-shift Slice/Concat)
                                └ else: model's own nodes      (prompts: the chunked WKV and the rest)

Both branches read the same top-level initializers, so ONNX Runtime pre-packs each weight once for the
session (1.32, 0.1B: fp32 601 vs 567 MiB after load, int4 179 vs 165). Two sessions, one over
model.onnx and one over a separate decode file, would hold two packed copies (1108 vs 567 MiB,
301 vs 165), which is why there is no decode.onnx: the artifact on disk is unchanged and the
decode path is built when a Session loads it (~0.1 s at 0.1B).

What T == 1 lets go (each rewrite is checked against shapes inferred with seq fixed to 1):
- fuse_wkv's If(Shape(r)[1] == 1): its then-branch (the direct WKV step) is inlined; the Shape,
  Equal and the prefill branches go.
- a Slice that keeps the last k positions of a length-1 axis returns its input, and the slice that
  drops the last is empty, so the token shift Concat(last, x[:, :-1]) is `last`.
- Reshape of a Reshape reads the first one's input (when the outer shape has no 0 to copy), and a
  Reshape to the shape its input already has is dropped.
Outputs that are graph outputs keep their names (an Identity when the value was rewritten away).
Nothing here changes a value: at T == 1 the decode path's outputs are bitwise model.onnx's on ORT's
CPU EP for fp32 and quantized graphs (tests/graph/test_decode_graph.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rwkv_opt.graph import contract
from rwkv_opt.graph.contract import Key, get_meta
from rwkv_opt.onnx_util import attr, drop_dead, inferred_value_info, producers, subgraphs


def decode_graph(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of `model` for T == 1 calls, or None when T == 1 would gain nothing (no fuse_wkv If:
    a Scan-only or function-mode graph) or the model is a training graph (its seq is fixed > 1)."""
    if get_meta(model, Key.TRAIN + "head") is not None:
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    if not _inline_step_branches(g):
        return None
    _fix_seq(g)
    shapes = _shapes(out)
    _rewrite(g, shapes)  # ends with drop_dead
    del g.value_info[:]
    return out


def with_decode_path(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """One graph for every call: If(T == 1) over decode_graph(model) and model's own nodes, both reading
    the same top-level initializers; inputs, outputs and metadata are model's. None when decode_graph is."""
    decode = decode_graph(model)
    if decode is None:
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    shared = {t.name for t in g.initializer}
    g.initializer.extend(t for t in decode.graph.initializer if t.name not in shared)  # the step's constants
    outputs = [o.name for o in g.output]
    then = _branch(decode.graph.node, outputs, "decode", internal=True)
    orig = _branch(g.node, outputs, "prompt", internal=False)
    p = "decode_path/"
    with_if = [
        helper.make_node("Shape", [contract.TOKENS], [p + "T"], start=1, end=2, name=p + "Shape"),
        helper.make_node("Equal", [p + "T", p + "one"], [p + "is_one"], name=p + "Equal"),
        helper.make_node("Squeeze", [p + "is_one"], [p + "cond"], name=p + "Squeeze"),
        helper.make_node("If", [p + "cond"], outputs, then_branch=then, else_branch=orig, name=p + "If"),
    ]
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), p + "one"))
    del g.node[:]
    g.node.extend(with_if)
    del g.value_info[:]
    return out


def _branch(nodes, outputs: list[str], tag: str, internal: bool) -> onnx.GraphProto:
    """`nodes` as an If branch returning `outputs`, renamed `tag`/NAME (the If defines the plain names).
    `internal`: every value the nodes make is renamed too (the decode branch: its values share names with
    the other branch's); else only the outputs."""
    rename = {o: f"{tag}/{o}" for o in outputs}
    if internal:
        rename.update({o: f"{tag}/{o}" for n in nodes for o in n.output})
    outs = [helper.make_empty_tensor_value_info(rename[o]) for o in outputs]
    return helper.make_graph([_renamed_copy(n, rename) for n in nodes], tag, [], outs)


def _renamed_copy(node: onnx.NodeProto, rename: dict[str, str]) -> onnx.NodeProto:
    """A copy of `node` whose outputs and reads (subgraph captures included) are renamed by `rename`."""
    c = onnx.NodeProto()
    c.CopyFrom(node)
    c.output[:] = [rename.get(x, x) for x in node.output]
    _rename_reads(c, rename)
    return c


def _rename_reads(node: onnx.NodeProto, rename: dict[str, str]) -> None:
    """Rename what `node` reads, in its inputs and in its subgraphs' captures (names a subgraph defines
    itself shadow the outer ones)."""
    node.input[:] = [rename.get(x, x) for x in node.input]
    for sg in subgraphs(node):
        own = {i.name for i in sg.input} | {t.name for t in sg.initializer} | {o for n in sg.node for o in n.output}
        inner = {k: v for k, v in rename.items() if k not in own}
        for n in sg.node:
            _rename_reads(n, inner)
        for o in sg.output:
            o.name = inner.get(o.name, o.name)


# ---- fuse_wkv's If ------------------------------------------------------------------------------------


def _const_ints(g: onnx.GraphProto, name: str, prod: dict) -> list[int] | None:
    """The int values of a constant (initializer or Constant node), else None."""
    for t in g.initializer:
        if t.name == name:
            return [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
    n = prod.get(name)
    if n is not None and n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
        return [int(v) for v in numpy_helper.to_array(n.attribute[0].t).reshape(-1)]
    return None


def _is_t_equals_one(g: onnx.GraphProto, cond: str, prod: dict) -> bool:
    """cond = Equal(Shape(v, start=1, end=2), [1]): fuse_wkv's test of T == 1."""
    eq = prod.get(cond)
    if eq is None or eq.op_type != "Equal":
        return False
    shape = prod.get(eq.input[0])
    return (
        shape is not None
        and shape.op_type == "Shape"
        and attr(shape, "start") == 1
        and attr(shape, "end") == 2
        and _const_ints(g, eq.input[1], prod) == [1]
    )


def _inline_step_branches(g: onnx.GraphProto) -> int:
    """Replace every If on T == 1 by the nodes of its then-branch -> number replaced."""
    prod = producers(g)
    nodes, count = [], 0
    for n in g.node:
        if n.op_type != "If" or not _is_t_equals_one(g, n.input[0], prod):
            nodes.append(n)
            continue
        branch = attr(n, "then_branch")
        rename = {o.name: outer for o, outer in zip(branch.output, n.output)}
        nodes += [_renamed_copy(b, rename) for b in branch.node]
        g.initializer.extend(branch.initializer)  # the branch's own small constants (named under its scope)
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    return count


# ---- shapes with seq = 1 --------------------------------------------------------------------------------


def _fix_seq(g: onnx.GraphProto) -> None:
    """The tokens input, and every input/output dim named like its seq dim, become 1."""
    tokens = next(i for i in g.input if i.name == contract.TOKENS)
    seq = tokens.type.tensor_type.shape.dim[1]
    name = seq.dim_param
    for vi in [*g.input, *g.output]:
        for d in vi.type.tensor_type.shape.dim:
            if (name and d.dim_param == name) or vi is tokens and d is seq:
                d.Clear()
                d.dim_value = 1


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    """name -> dims (int, or None when symbolic/unknown) of every value ONNX can infer. ONNX's
    inference stops at com.microsoft ops, so the quantized ones are seen through float stand-ins
    with the same output shape (a value whose shape stays unknown is simply not rewritten)."""
    view = onnx.ModelProto()
    view.CopyFrom(model)
    dims = {t.name: list(t.dims) for t in view.graph.initializer}
    fakes = []
    for n in view.graph.node:
        stand_in = _stand_in(n, dims)
        if stand_in is not None:
            op, fake_dims = stand_in
            fake = f"{n.output[0]}/shape_stand_in"
            fakes.append(helper.make_tensor_value_info(fake, onnx.TensorProto.FLOAT, fake_dims))
            inputs = [n.input[0], fake] if op == "MatMul" else [fake, n.input[1]]
            n.CopyFrom(helper.make_node(op, inputs, [n.output[0]], name=n.name))
    view.graph.input.extend(fakes)
    out = {}
    for vi in inferred_value_info(view, keep_up_to=64):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return out


def _stand_in(n: onnx.NodeProto, dims: dict[str, list]) -> tuple[str, list] | None:
    """(standard op, float dims of the weight it stands in for) computing the shape `n` computes, for the
    quantized ops."""
    if n.domain != "com.microsoft":
        return None
    if n.op_type == "MatMulNBits":
        return "MatMul", [attr(n, "K"), attr(n, "N")]
    if n.op_type == "DynamicQuantizeMatMul" and n.input[1] in dims:
        return "MatMul", dims[n.input[1]]
    if n.op_type == "GatherBlockQuantized" and n.input[0] in dims:
        table = list(dims[n.input[0]])
        table[-1] *= 8 // attr(n, "bits", 4)  # 4-bit codes are packed two to a byte
        return "Gather", table
    return None


# ---- rewrites ---------------------------------------------------------------------------------------------

_BIG = 2**62  # a Slice end at or past this is "to the end"


def _slice_axis1(g, n, prod) -> tuple[int, int] | None:
    """(start, end) of a Slice over axis 1 with step 1, from constants; else None."""
    if n.op_type != "Slice" or len(n.input) < 4:
        return None
    starts, ends, axes = (_const_ints(g, x, prod) for x in n.input[1:4])
    steps = _const_ints(g, n.input[4], prod) if len(n.input) > 4 and n.input[4] else [1]
    if axes != [1] or steps != [1] or starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
        return None
    return starts[0], ends[0]


def _rewrite(g: onnx.GraphProto, shapes: dict[str, list]) -> None:
    """Alias away the T == 1 no-ops (see the module docstring); graph outputs keep their names."""
    prod = producers(g)
    alias: dict[str, str] = {}
    empty: set[str] = set()
    unit = lambda v: (shapes.get(v) or [None, None])[1:2] == [1]  # noqa: E731  axis 1 has length 1
    read = lambda v: alias.get(v, v)  # noqa: E731
    for n in g.node:
        n.input[:] = [read(x) for x in n.input]
        sl = _slice_axis1(g, n, prod)
        if sl is not None and unit(n.input[0]):
            start, end = sl
            if start <= 0 and end >= _BIG:  # x[:, -k:] (the token shift's last, the last block's tail) or x[:, 0:]
                alias[n.output[0]] = n.input[0]
            elif start == 0 and end in (0, -1):
                empty.add(n.output[0])
        elif n.op_type == "Concat" and attr(n, "axis") == 1:
            kept = [x for x in n.input if x not in empty]
            if len(kept) == 1 and len(n.input) > 1:
                alias[n.output[0]] = kept[0]
        elif n.op_type == "Reshape":
            _reshape(g, n, prod, shapes, alias)
    _apply(g, alias)


def _reshape(g, n, prod, shapes, alias) -> None:
    src, target = n.input[0], _const_ints(g, n.input[1], prod)
    if target is None or attr(n, "allowzero", 0):
        return
    inner = prod.get(src)
    if inner is not None and inner.op_type == "Reshape" and 0 not in target:
        n.input[0] = inner.input[0]  # the inner Reshape goes when nothing else reads it
    have, want = shapes.get(n.input[0]), shapes.get(n.output[0])
    if have is not None and have == want and None not in have:
        alias[n.output[0]] = n.input[0]


def _apply(g: onnx.GraphProto, alias: dict[str, str]) -> None:
    """Point readers at the aliases; a graph output that became an alias is an Identity."""

    def final(v):
        while v in alias:
            v = alias[v]
        return v

    kept = [n for n in g.node if not all(o in alias for o in n.output)]
    for n in kept:
        n.input[:] = [final(x) for x in n.input]
    del g.node[:]
    g.node.extend(kept)
    outputs = {o.name for o in g.output}
    for name in alias:
        if name in outputs:
            g.node.append(helper.make_node("Identity", [final(name)], [name], name=f"{name}/decode_alias"))
    drop_dead(g)
