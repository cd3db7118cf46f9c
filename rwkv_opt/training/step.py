"""One ORT call = one training step: forward, backward (plain ONNX ops), global-norm clip, AdamW.

    x, mask[, reward] ─ forward (training/graph.py) ─ loss ──────────────────────────────┐
    loss ─ onnxsim.graph_grad.build_backward ─ dL/dp for each trainable p               │
    g_norm = sqrt(sum_p sum(dL/dp^2));  c = min(1, max_grad_norm / (g_norm + 1e-6))     │
    per p:  g = c * dL/dp                                                                │
            m' = b1 m + (1-b1) g;   v' = b2 v + (1-b2) g^2                               │
            p' = p (1 - lr wd_p) - lr/(1-b1^t) * m' / (sqrt(v'/(1-b2^t)) + eps)          │
    outputs: loss, grad_norm (before clipping), p', m', v'  <───────────────────────────┘

The backward comes from onnxsim 0.8.1's graph_grad (reverse-mode rules emitted as ordinary ONNX
nodes, so the step runs on stock onnxruntime), with three choices of ours:
- Split (the unrolled WKV's per-step slices) is differentiated as one Concat (_split_as_concat)
  instead of graph_grad's per-output selection MatMuls + Adds, which cost O(T^2).
- Embedding tables (`emb.weight`, DeepEmbed `s_emb`) get a ScatterND(reduction=add) of the
  gathered rows' gradient instead of graph_grad's Gather rule, which builds a dense [B*T, V]
  one-hot and a V x (B*T) x C matmul (6.4 GFLOP per step for the 0.1B head-sized table).
- Stop-gradient nodes (the log-sum-exp row max) are left out of the differentiated slice, and
  only nodes on a path from a trainable parameter to the loss are differentiated; what the rules
  emit for frozen inputs is removed by a dead-code pass before the model is assembled.
Hyperparameters are scalar inputs (lr, step, beta1, beta2, eps, weight_decay, max_grad_norm), so
one graph serves any schedule; `step` is the 1-based AdamW step used by the bias corrections.
Weight decay applies, as in RWKV-LM, to 2-D parameters named `*.weight` (decoupled, AdamW).
Trainable parameters and the moments are inputs whose next values are outputs, so the caller
threads OrtValues from one call into the next. Frozen parameters are constants by default (a
self-contained model) or plain inputs (frozen='inputs'): the Trainer feeds them as OrtValues
that alias its numpy arrays, because constants cost three copies each (initializer, serialized
model, ORT's own), 2.3 GB per session for the 0.1B shape with only LoRA trainable.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper

from rwkv_opt.graph.contract import Key
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.training.graph import LOSS, MASK, OPSET, REWARD, TOKENS, LossGraph, Objective

GRAD_NORM = "grad_norm"
SCALARS = ("lr", "step", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm")


def m_name(p: str) -> str:
    return f"adamw.m/{p}"


def v_name(p: str) -> str:
    return f"adamw.v/{p}"


def next_name(name: str) -> str:
    return f"{name}.next"


def decays(name: str, shape) -> bool:
    """RWKV-LM's rule: weight decay for 2-D parameters named *.weight (emb, head, linears)."""
    return len(shape) == 2 and name.endswith(".weight")


@dataclass
class StepGraph:
    model: onnx.ModelProto
    trainable: tuple[str, ...]
    state: dict[str, str]  # state input -> output carrying its next value
    data_inputs: tuple[str, ...]


def _graph_grad():
    try:
        from onnxsim import graph_grad, qat_graph
    except ImportError as e:  # onnxsim < 0.8 has no graph_grad
        raise RwkvOptError(
            f"training needs onnxsim >= 0.8.1 (its graph_grad module): {e}; "
            "install it with `pip install 'onnxsim>=0.8.1'`."
        ) from None
    return graph_grad, qat_graph


def static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Every value's static shape (graph_grad needs them at build time)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {}
    for v in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
        if any(d < 0 for d in dims):
            raise RwkvOptError(f"training graph value {v.name} has a non-static shape {dims}")
        shapes[v.name] = dims
    for t in inferred.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _slice(nodes, sources: set[str], sink: str, excluded: set[str]) -> list[onnx.NodeProto]:
    """Nodes on a path from `sources` to `sink`, in graph order, minus `excluded` node names."""
    down, keep = set(sources), []
    for n in nodes:
        if n.name not in excluded and any(i in down for i in n.input):
            down.update(n.output)
    up = {sink}
    for n in reversed(nodes):
        if n.name not in excluded and any(o in up for o in n.output) and any(i in down for i in n.input):
            up.update(i for i in n.input if i)
            keep.append(n)
    return keep[::-1]


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers no graph output depends on."""
    g = model.graph
    live = {o.name for o in g.output}
    kept = []
    for n in reversed(g.node):
        if any(o in live for o in n.output):
            kept.append(n)
            live.update(i for i in n.input if i)
    del g.node[:]
    g.node.extend(kept[::-1])
    inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)
    return model


def _frozen_initializers(lg: LossGraph, trainable: set[str]) -> list[TensorProto]:
    return [numpy_helper.from_array(a, k) for k, a in lg.params.items() if k not in trainable]


def _data_inputs(lg: LossGraph) -> list[onnx.ValueInfoProto]:
    names = (TOKENS, MASK, REWARD) if lg.objective is Objective.REINFORCE else (TOKENS, MASK)
    return [i for i in lg.model.graph.input if i.name in names]


def _params_in(lg: LossGraph, trainable, frozen: str) -> tuple[list, list[TensorProto]]:
    """(parameter inputs, parameter initializers): trainable ones are inputs; frozen ones are
    constants (frozen='constants', a self-contained model) or inputs too (frozen='inputs': the
    caller feeds them, e.g. as OrtValues shared by several sessions, with no copy in the model)."""
    if frozen not in ("constants", "inputs"):
        raise ValueError(f"frozen must be 'constants' or 'inputs', not {frozen!r}")
    keep = set(lg.params) if frozen == "inputs" else set(trainable)
    inputs = [i for i in lg.model.graph.input if i.name in keep]
    return inputs, ([] if frozen == "inputs" else _frozen_initializers(lg, set(trainable)))


def build_eval_graph(lg: LossGraph, trainable=(), frozen: str = "constants") -> onnx.ModelProto:
    """Loss only (outputs `loss`, `nll`): `trainable` parameters are inputs (see _params_in for the rest)."""
    g = lg.model.graph
    params, inits = _params_in(lg, trainable, frozen)
    graph = helper.make_graph(
        list(g.node), "rwkv7_eval", _data_inputs(lg) + params, list(g.output), initializer=list(g.initializer) + inits
    )
    m = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=lg.model.ir_version, producer_name="rwkv-opt"
    )
    m.metadata_props.extend(lg.model.metadata_props)
    return prune(m)


@contextlib.contextmanager
def _split_as_concat(graph_grad):
    """Differentiate Split as one Concat of its outputs' gradients, for the duration of a build.

    graph_grad's own Split rule emits, per output, a selection MatMul that widens the output's
    gradient back to the input's full size, then Adds them: O(T^2) work and T full-size
    temporaries for each T-way split of the unrolled WKV (measured: ~1/3 of a 0.1B step). Its
    table of multi-output rules has no registration hook (register_gradient covers single-output
    ops), so the entry is swapped here and restored on exit. If the table is not there, the
    builtin rule is used: slower, equally correct."""
    table = getattr(graph_grad, "_MULTI_OUTPUT_RULES", None)
    if not isinstance(table, dict) or "Split" not in table:
        yield
        return
    builtin = table["Split"]

    def concat_rule(ctx, node, gs):
        if all(g is None for g in gs):
            return [None] * len(node.input)
        rank = len(ctx.shape(node.input[0]))
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % rank
        parts = [
            g if g is not None else ctx.b.const(np.zeros(ctx.shape(o), np.float32), "split_zero")
            for o, g in zip(node.output, gs)
        ]
        return [ctx.b.op("Concat", parts, axis=axis)] + [None] * (len(node.input) - 1)

    table["Split"] = concat_rule
    try:
        yield
    finally:
        table["Split"] = builtin


def _backward(lg: LossGraph, trainable):
    """Forward nodes + graph_grad's backward in one onnxsim builder -> (builder, {param: grad}, shapes)."""
    graph_grad, qat_graph = _graph_grad()
    fwd = lg.model.graph
    shapes = static_shapes(lg.model)
    by_name = {n.name: n for n in fwd.node}
    tables = {}  # trainable table -> gather nodes reading it
    for name in lg.embeddings:
        n = by_name[name]
        if n.input[0] in trainable:
            tables.setdefault(n.input[0], []).append(n)
    gathers = {n.name for ns in tables.values() for n in ns}
    rows = [n.output[0] for ns in tables.values() for n in ns]
    targets = [p for p in trainable if p not in tables] + rows
    nodes = _slice(list(fwd.node), set(trainable) | set(rows), LOSS, set(lg.stop_gradient) | gathers)

    b = qat_graph.GraphBuilder(prefix="grad/")
    b.nodes = list(fwd.node)
    b.initializer = list(fwd.initializer)
    seed = b.const(np.array(1.0, np.float32), "seed")
    with _split_as_concat(graph_grad):
        grads = graph_grad.build_backward(b, nodes=nodes, shapes=shapes, grad_outputs={LOSS: seed}, targets=targets)
    for table, ns in tables.items():
        grads[table] = _scatter_rows(b, ns, grads, lg.params[table].shape)
    return b, {p: grads[p] for p in trainable}, shapes


def _assemble(lg: LossGraph, b, name: str, inputs, outputs, frozen: list[TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, name, inputs, outputs, initializer=b.initializer + frozen)
    domains = sorted({f.domain for f in b.functions})
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        functions=list(b.functions),
        producer_name="rwkv-opt",
        ir_version=lg.model.ir_version,
    )
    if b.functions:  # graph_grad's templated rules are local functions: expand them for any runtime
        model = onnx.inliner.inline_local_functions(model)
        del model.functions[:]
        keep = [o for o in model.opset_import if o.domain == ""]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    model.metadata_props.extend(lg.model.metadata_props)
    return prune(model)


def _trainable(lg: LossGraph, trainable) -> tuple[str, ...]:
    chosen = set(trainable)
    unknown = sorted(chosen - set(lg.params))
    if unknown:
        raise RwkvOptError(f"'{unknown[0]}' is not a trained parameter of this model.")
    out = tuple(k for k in lg.params if k in chosen)
    if not out:
        raise RwkvOptError("no parameter is trainable; choose at least one with --trainable.")
    return out


def build_grad_graph(lg: LossGraph, trainable, frozen: str = "constants") -> onnx.ModelProto:
    """Loss and raw gradients (outputs `loss`, `grad/<param>`), for checks and diagnostics."""
    trainable = _trainable(lg, trainable)
    b, grads, shapes = _backward(lg, trainable)
    outs = [helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, [])]
    for p in trainable:
        b.nodes.append(helper.make_node("Identity", [grads[p]], [f"grad/{p}"]))
        outs.append(helper.make_tensor_value_info(f"grad/{p}", TensorProto.FLOAT, shapes[p]))
    params, inits = _params_in(lg, trainable, frozen)
    return _assemble(lg, b, "rwkv7_grad", _data_inputs(lg) + params, outs, inits)


def build_step_graph(lg: LossGraph, trainable, frozen: str = "constants") -> StepGraph:
    """The fused training step for `lg` with `trainable` parameter names (see module docstring).

    Inputs: data, then per trainable p: p, adamw.m/p, adamw.v/p, then the scalars (and, with
    frozen='inputs', the frozen parameters last)."""
    trainable = _trainable(lg, trainable)
    b, grads, shapes = _backward(lg, trainable)
    gnorm = b.op(
        "Sqrt", [b.op("Sum", [b.op("ReduceSumSquare", [grads[p]], keepdims=0) for p in trainable])], "grad_norm"
    )
    clip = b.op("Min", [b.const(1.0), b.div("max_grad_norm", b.add(gnorm, b.const(1e-6)))])
    # scalars folded so that each tensor costs ~14 elementwise passes, with no whole-model temporaries
    one = b.const(1.0)
    c1 = b.mul(b.sub(one, "beta1"), clip)  # (1-b1) c
    c2 = b.mul(b.sub(one, "beta2"), b.mul(clip, clip))  # (1-b2) c^2
    inv_bc2 = b.div(one, b.sub(one, b.op("Pow", ["beta2", "step"])))  # 1 / (1 - b2^t)
    step_size = b.div("lr", b.sub(one, b.op("Pow", ["beta1", "step"])))  # lr / (1 - b1^t)
    keep = b.sub(one, b.mul("lr", "weight_decay"))  # 1 - lr wd
    state, outputs = {}, []
    for p in trainable:
        m2 = b.add(b.mul("beta1", m_name(p)), b.mul(c1, grads[p]))
        v2 = b.add(b.mul("beta2", v_name(p)), b.mul(c2, b.mul(grads[p], grads[p])))
        denom = b.add(b.sqrt(b.mul(v2, inv_bc2)), "eps")
        base = b.mul(p, keep) if decays(p, shapes[p]) else p
        p2 = b.sub(base, b.mul(step_size, b.div(m2, denom)))
        for src, new in ((p, p2), (m_name(p), m2), (v_name(p), v2)):
            b.nodes.append(helper.make_node("Identity", [new], [next_name(src)]))
            state[src] = next_name(src)
            outputs.append(helper.make_tensor_value_info(next_name(src), TensorProto.FLOAT, shapes[p]))
    b.nodes.append(helper.make_node("Identity", [gnorm], [GRAD_NORM]))

    data = _data_inputs(lg)
    inputs = data + [
        helper.make_tensor_value_info(s, TensorProto.FLOAT, shapes[p])
        for p in trainable
        for s in (p, m_name(p), v_name(p))
    ]
    inputs += [helper.make_tensor_value_info(s, TensorProto.FLOAT, []) for s in SCALARS]
    params, inits = _params_in(lg, trainable, frozen)
    inputs += [i for i in params if i.name not in set(trainable)]
    outs = [
        helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, []),
        helper.make_tensor_value_info(GRAD_NORM, TensorProto.FLOAT, []),
    ] + outputs
    model = _assemble(lg, b, "rwkv7_train_step", inputs, outs, inits)
    model.metadata_props.add(key=Key.TRAIN + "trainable", value=",".join(trainable))
    return StepGraph(model, trainable, state, tuple(i.name for i in data))


def bake(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` with the inputs named in `arrays` turned into constants."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [i for i in out.graph.input if i.name not in arrays]
    del out.graph.input[:]
    out.graph.input.extend(kept)
    out.graph.initializer.extend(numpy_helper.from_array(a, k) for k, a in arrays.items())
    return out


def _scatter_rows(b, gathers, grads, table_shape) -> str:
    """dL/dtable as a scatter-add of each gather's row gradients into zeros of the table's shape."""
    acc = b.op(
        "ConstantOfShape", [_int64(b, list(table_shape))], value=numpy_helper.from_array(np.zeros(1, np.float32))
    )
    for n in gathers:
        idx = b.op("Reshape", [n.input[1], _int64(b, [-1, 1])])
        acc = b.op("ScatterND", [acc, idx, grads[n.output[0]]], "embed_grad", reduction="add")
    return acc


def _int64(b, values) -> str:
    name = b.name("i64")
    b.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
    return name
