"""simplify: onnxsim constant folding and dead-code removal over the graph's structure.

before -> after: the same model with constant sub-expressions folded and redundant nodes removed.
onnxsim sees the graph without its weights: every initializer of tensorstore.INLINE_BYTES or more
is handed to it as a graph input of the same name, type and shape, and put back afterwards (the
same TensorProto: an external reference stays one). So it never holds the weights, never meets
protobuf's 2 GB limit, and costs the same at 7B as at 0.1B; what it cannot do is fold a
computation on a weight (e.g. a Cast of an fp16 weight), which is what ORT does at session start.
Measured on the built-in targets (tiny, 0.1B): onnxsim with the weights changed nothing either
(the builder emits no foldable expression); it stays for heads and custom targets. The fixed-point
iteration count is bounded.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import onnx
from onnx import helper

from rwkv_opt.progress import phase
from rwkv_opt.passes.base import Pass, PassConfig, PassResult, mark_applied, names_read, register
from rwkv_opt.tensorstore import is_weight


_ITERS_ENV = "ONNXSIM_FIXED_POINT_ITERS"  # onnxsim 0.8 reads its fixed-point bound from here
# MatMul+Add -> Gemm needs Reshapes around it for our 3-D activations: slower on ORT, skip it.
_SKIPPED = ["fuse_matmul_add_bias_into_gemm", "fuse_matmul_add_bias_into_gemm_batched"]


@dataclass(frozen=True)
class SimplifyConfig(PassConfig):
    max_iterations: int = 5  # onnxsim's fixed point may run to its limit (50) on Scan bodies: bound it


@register
class Simplify(Pass):
    name = "simplify"
    Config = SimplifyConfig
    description = "onnxsim: fold constants, drop dead nodes (bounded iterations)"

    def run(self, model: onnx.ModelProto) -> PassResult:
        import onnxsim

        before = Counter(n.op_type for n in model.graph.node)
        old = os.environ.get(_ITERS_ENV)
        os.environ[_ITERS_ENV] = str(self.config.max_iterations)
        stripped, weights = _weightless(model)
        try:
            with phase("onnxsim"):
                out, ok = onnxsim.simplify(stripped, check_n=0, mutable_initializer=False, skipped_optimizers=_SKIPPED)
        finally:
            if old is None:
                os.environ.pop(_ITERS_ENV, None)
            else:
                os.environ[_ITERS_ENV] = old
        if ok:
            _restore(out, weights)
        if not ok:
            return PassResult(model, False, ["onnxsim could not validate the simplified model: kept the input"])
        del out.metadata_props[:]
        out.metadata_props.extend(model.metadata_props)
        after = Counter(n.op_type for n in out.graph.node)
        mark_applied(out, self.name)
        diff = {k: after[k] - before[k] for k in sorted(set(before) | set(after)) if after[k] != before[k]}
        return PassResult(
            out, before != after, [f"nodes {sum(before.values())} -> {sum(after.values())}", f"op delta {diff}"]
        )


def _weightless(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of `model` whose large initializers are graph inputs instead (name -> the tensor)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)  # cheap when the weights are external; copies them once otherwise
    g, weights, keep = m.graph, {}, []
    for t in g.initializer:
        if is_weight(t):
            weights[t.name] = t
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    del g.initializer[:]
    g.initializer.extend(keep)
    return m, weights


def _restore(out: onnx.ModelProto, weights: dict[str, onnx.TensorProto]) -> None:
    """Turn the weight inputs back into the initializers they were (those still read)."""
    g = out.graph
    inputs = [i for i in g.input if i.name not in weights]
    read = names_read(g)
    del g.input[:]
    g.input.extend(inputs)
    g.initializer.extend(t for name, t in weights.items() if name in read)
