"""The first k blocks of a model and its head: verification when the whole model cannot be loaded.

    x ─ emb ─ block 0 ─ ... ─ block k-1 ─ head        (blocks k..L-1 and their state I/O removed)

A 7.2B fp16 artifact costs its fp32 bytes (28.7 GiB) in an ORT CPU session, because the CPU EP
casts fp16 weights to fp32 at load. The pipeline then verifies the largest prefix that fits: the
same nodes, names and weights (the truncated model reads the artifact's own model.onnx.data), with
the head reading block k-1's residual output, compared against the reference cut the same way. What
it proves: the embedding, the first k blocks and the head were converted right; what it does not:
blocks k..L-1 (their graph passed the checker and the fp32 state-path invariant like the rest).
"""

from __future__ import annotations

import json
import re

import onnx

from rwkv_opt.graph.contract import Key
from rwkv_opt.graph import contract
from rwkv_opt.passes.base import drop_dead

_BLOCK = re.compile("^/" + re.escape(contract.Scope.BLOCK).replace(r"\{i\}", r"(\d+)") + "/")


def _block_of(node: onnx.NodeProto) -> int | None:
    m = _BLOCK.match(node.name)
    return int(m.group(1)) if m else None


def residual_out(graph: onnx.GraphProto, i: int) -> str:
    """The residual stream after block i: the tensor block i writes last that the next stage reads."""
    made = {}
    for n in graph.node:
        if _block_of(n) == i:
            for o in n.output:
                made[o] = n
    after = i + 1
    readers = [
        n
        for n in graph.node
        if (_block_of(n) == after)
        or (_block_of(n) is None and n.name.startswith(contract.scope_path(contract.Scope.HEAD)))
    ]
    read = {t for n in readers for t in n.input if t in made}
    order = {id(n): k for k, n in enumerate(graph.node)}
    if not read:
        raise ValueError(f"cannot find the residual output of block {i}")
    return max(read, key=lambda t: order[id(made[t])])


def truncate(model: onnx.ModelProto, k: int) -> onnx.ModelProto:
    """A copy of `model` (weightless or not) with blocks k..L-1 removed; metadata says n_layer = k."""
    meta = {p.key: p.value for p in model.metadata_props}
    cfg = json.loads(meta[Key.CONFIG])
    n_layer = int(cfg["n_layer"])
    if not 1 <= k <= n_layer:
        raise ValueError(f"truncate: k must be in 1..{n_layer}, got {k}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if k == n_layer:
        return out
    g = out.graph
    last = residual_out(g, n_layer - 1)
    cut = residual_out(g, k - 1)
    for n in g.node:
        if _block_of(n) is None:
            for j, t in enumerate(n.input):
                if t == last:
                    n.input[j] = cut
    dropped_io = {name for i in range(k, n_layer) for name in (*contract.state_inputs(i), *contract.state_outputs(i))}
    keep_nodes = [n for n in g.node if (_block_of(n) or 0) < k]
    del g.node[:]
    g.node.extend(keep_nodes)
    outs = [o for o in g.output if o.name not in dropped_io]
    del g.output[:]
    g.output.extend(outs)
    drop_dead(g)
    ins = [i for i in g.input if i.name not in dropped_io]
    del g.input[:]
    g.input.extend(ins)
    cfg["n_layer"] = k
    for p in out.metadata_props:
        if p.key == Key.CONFIG:
            p.value = json.dumps(cfg)
        elif p.key == Key.N_LAYER:
            p.value = str(k)
    return out
