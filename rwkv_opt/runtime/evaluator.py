"""A Session over onnx.reference instead of ORT, for graphs ORT's CPU EP cannot run (bf16).

It rounds every op's output to its dtype and accumulates MatMul/reductions/LayerNorm in fp32,
as a GPU EP does (rounding_evaluator). It is slow: tiny models only.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx

from rwkv_opt.graph.contract import Meta
from rwkv_opt.artifact import model_path
from rwkv_opt.runtime.session import Session

_ELEM = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


def rounding_evaluator(model: onnx.ModelProto):
    """An onnx.reference.ReferenceEvaluator that rounds the way a GPU EP does.

    ORT's CPU EP runs fp16 nodes through fp32 and drops the fp32 -> fp16 -> fp32 Cast pairs between
    neighbouring nodes (measured on 1.32: a chain of two fp16 Muls equals the fp32 chain rounded
    once), so its fp16 numbers are optimistic, and it has no bf16 kernels at all. This evaluator
    rounds every op's output to its tensor's dtype, while MatMul, ReduceSum, ReduceL2 and
    LayerNormalization (stash_type=1) accumulate in fp32 as cuBLAS / the CUDA EP's kernels do.
    It also runs Scan over any axis (onnx.reference only does axis 0). Slow: tiny models only.
    """
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops.op_layer_normalization import _layer_normalization
    from onnx.reference.ops.op_matmul import MatMul as _MatMul
    from onnx.reference.ops.op_reduce_l2 import ReduceL2_18
    from onnx.reference.ops.op_reduce_sum import ReduceSum_13
    from onnx.reference.ops.op_scan import Scan as _Scan

    f32 = lambda t: None if t is None else t.astype(np.float32)  # noqa: E731

    weights32: dict[int, np.ndarray] = {}  # id(low-precision initializer) -> its fp32 copy (same cast, once)

    class MatMul(_MatMul):
        def _run(self, a, b):
            b32 = weights32.get(id(b))
            return ((f32(a) @ (f32(b) if b32 is None else b32)).astype(a.dtype),)

    class ReduceSum(ReduceSum_13):
        def _run(self, x, axes=None, keepdims=None, noop_with_empty_axes=None):
            return (super()._run(f32(x), axes, keepdims, noop_with_empty_axes)[0].astype(x.dtype),)

    class ReduceL2(ReduceL2_18):
        def _run(self, x, axes=None, keepdims=1, noop_with_empty_axes=0):
            return (super()._run(f32(x), axes, keepdims, noop_with_empty_axes)[0].astype(x.dtype),)

    class LayerNormalization(OpRun):
        def _run(self, x, scale, b=None, axis=None, epsilon=None, stash_type=None):
            stats = f32 if stash_type == 1 else (lambda t: t)
            y, mean, inv = _layer_normalization(stats(x), stats(scale), stats(b), axis=axis, epsilon=epsilon)
            return y.astype(x.dtype), mean, inv

    class Scan(_Scan):
        def __init__(self, onnx_node, run_params):
            OpRun.__init__(self, onnx_node, run_params)
            self.in_axes = list(self.scan_input_axes or [0] * self.num_scan_inputs)
            self.out_axes = list(self.scan_output_axes or [])
            self.scan_input_axes = self.scan_output_axes = None
            self.input_directions_ = self.input_axes_ = [0] * self.num_scan_inputs
            self.input_names, self.output_names = self.body.input_names, self.body.output_names

        def _run(self, *args, context=None, bindings=None, **_):
            k = len(args) - self.num_scan_inputs
            args = [*args[:k], *(np.moveaxis(a, ax, 0) for a, ax in zip(args[k:], self.in_axes))]
            outs = list(super()._run(*args, context=context, bindings=bindings))
            for j, ax in enumerate(self.out_axes):
                outs[k + j] = np.moveaxis(outs[k + j], 0, ax)
            return tuple(outs)

    ops = [MatMul, ReduceSum, ReduceL2, LayerNormalization, Scan]
    for op in ops:
        op.op_domain = ""
    ev = ReferenceEvaluator(model, new_ops=ops)
    weights32.update(
        {
            id(t): t.astype(np.float32)
            for t in ev.rt_inits_.values()
            if isinstance(t, np.ndarray) and t.dtype in (np.float16, ml_dtypes.bfloat16) and t.ndim == 2
        }
    )
    return ev


class EvaluatorSession(Session):
    def __init__(self, artifact, max_chunk: int = 1024):  # noqa: super().__init__ would start ORT
        self.path = model_path(Path(artifact))
        model = onnx.load(str(self.path))
        meta = Meta.of(model)
        self.meta, self.config, self.logits_mode = meta.props, meta.config(), meta.logits
        self.ev = rounding_evaluator(model)
        self.output_names = [o.name for o in model.graph.output]
        self._in_types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        self.max_chunk = max_chunk
        self.has_sampler = False

    def _state_dtype(self, name: str):
        return _ELEM.get(self._in_types[name], ml_dtypes.bfloat16)

    def run(self, feed: dict) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.ev.run(None, feed)))
