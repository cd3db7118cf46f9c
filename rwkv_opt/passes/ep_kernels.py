"""Which ONNX ops each execution provider can run in bf16: data, read by the bf16 pass.

Source: ONNX Runtime's generated kernel registry table, docs/OperatorKernels.md in
microsoft/onnxruntime (commit 8f063305aacd23aadf77cda4c52e0592a02a7161), sections "Operators
implemented by CUDAExecutionProvider" and "... by CPUExecutionProvider", ai.onnx domain: an op is
listed here when its type constraint for the data tensor (T, or V for control flow) includes
tensor(bfloat16), with the first opset version from which it does. Conservative by design: ops
whose bf16 row we did not see (or that the table lists for bf16 only through a contrib variant)
are absent, so the bf16 pass keeps them fp32. Re-read the table when onnxruntime-gpu is upgraded.

Absent from the CUDA table, hence fp32 islands in a bf16 graph: Exp (decay) and ReduceL2 (kk
normalize) of the base graph, and among ops other passes may add: Log, CumSum, Pow, Sqrt, Neg,
Reciprocal, ReduceMean, Where, Tile.

The CPU EP registers bf16 only for data movement (Cast, Concat, Gather, ...): no arithmetic
at all (docs/precision.md section 1; Add/Mul/MatMul in bf16 fail to load on onnxruntime 1.32 CPU).
"""

from __future__ import annotations

from rwkv_opt.config import Provider

# op type -> first opset whose kernel takes bf16
BF16_KERNELS: dict[Provider, dict[str, int]] = {
    Provider.CUDA: {
        # arithmetic and activations
        "Add": 13,
        "Sub": 13,
        "Mul": 13,
        "Div": 13,
        "Sum": 6,
        "Max": 6,
        "Min": 6,
        "Mod": 13,
        "MatMul": 13,
        "Gemm": 13,
        "Relu": 13,
        "Sigmoid": 13,
        "Tanh": 13,
        "Softmax": 13,
        "ReduceSum": 13,
        "LayerNormalization": 17,  # T = bf16 with U (Mean/InvStdDev stash) = float
        "Dropout": 13,
        # data movement and control flow
        "Cast": 13,
        "Concat": 4,
        "Compress": 9,
        "ConstantOfShape": 9,
        "Expand": 8,
        "Flatten": 1,
        "Gather": 1,
        "GatherElements": 11,
        "GatherND": 13,
        "Identity": 1,
        "Reshape": 1,
        "Shape": 1,
        "Size": 1,
        "Slice": 1,
        "Split": 2,
        "Squeeze": 1,
        "Unsqueeze": 1,
        "Transpose": 1,
        "Trilu": 14,
        "ReverseSequence": 10,
        "Scatter": 9,
        "ScatterElements": 11,
        "ScatterND": 11,
        "If": 1,
        "Loop": 1,
        "Scan": 9,
    },
    Provider.CPU: {
        "Cast": 6,
        "Compress": 9,
        "Concat": 4,
        "Flatten": 1,
        "Gather": 1,
        "GatherElements": 11,
        "GatherND": 11,
    },
}


def bf16_ops(provider: Provider, opset: int) -> frozenset[str]:
    """Op types `provider` runs in bf16 at `opset` (empty when the provider has no table)."""
    return frozenset(op for op, since in BF16_KERNELS.get(provider, {}).items() if opset >= since)
