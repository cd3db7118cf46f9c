"""simplify: onnxsim constant folding and dead-code removal with a bounded iteration count.

before -> after: the same model with constant sub-expressions folded and redundant nodes
removed. Runs through file paths for models over 1 GiB (protobuf cannot serialise 2 GB in
one message), and bounds onnxsim's fixed-point iterations.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx

from rwkv_opt.artifact import initializer_bytes, save_model
from rwkv_opt.passes.base import Pass, PassConfig, PassResult, mark_applied, register


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
        try:
            if initializer_bytes(model) > (1 << 30):  # protobuf's 2 GB limit: go through files
                with tempfile.TemporaryDirectory() as d:
                    src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
                    save_model(model, src, external=True)
                    _, ok = onnxsim.simplify(str(src), check_n=0, output_path=str(dst), skipped_optimizers=_SKIPPED)
                    out = onnx.load(str(dst)) if ok else model
            else:
                out, ok = onnxsim.simplify(model, check_n=0, mutable_initializer=False, skipped_optimizers=_SKIPPED)
        finally:
            if old is None:
                os.environ.pop(_ITERS_ENV, None)
            else:
                os.environ[_ITERS_ENV] = old
        if not ok:
            return PassResult(model, False, ["onnxsim could not validate the simplified model: kept the input"])
        del out.metadata_props[:]
        out.metadata_props.extend(model.metadata_props)
        after = Counter(n.op_type for n in out.graph.node)
        mark_applied(out, self.name)
        diff = {k: after[k] - before[k] for k in sorted(set(before) | set(after)) if after[k] != before[k]}
        return PassResult(out, before != after,
                          [f"nodes {sum(before.values())} -> {sum(after.values())}", f"op delta {diff}"])
