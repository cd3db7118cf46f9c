"""bf16: fp16_mixed's policy in bf16, plus an fp32 island around every op the target EP has no
bf16 kernel for (rwkv_opt.passes.ep_kernels, read from ORT's OperatorKernels.md).

before -> after (per layer; `=` fp32, `~` bf16):
    ~ LN1 (fp32 statistics: stash_type=1) ~ token shift ~ lerps ~ r/k/v/a/gate/v_mix matmuls
    = decay (/att/decay/), kk l2-normalize (/att/normalize/), GroupNorm ln_x (/att/ln_x/)
    = WKV (Scan or fuse_wkv's If, never entered), its inputs cast to fp32 just before it, state fp32
    = any other op missing from the EP's bf16 table (on CUDA: Exp, ReduceL2, Pow, Sqrt, Where, ...)
    ~ everything else; logits and x_tmix/x_cmix state I/O fp32 (or bf16 with io_dtype=bf16)

Constraints: an fp32 rwkv-opt model in; a provider whose bf16 table has MatMul (the CPU EP has no
bf16 arithmetic: refused). ORT's CPU EP cannot run the result; check it numerically with
onnx.reference.ReferenceEvaluator and structurally against the table (tests/passes).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from rwkv_opt.config import Precision, Provider
from rwkv_opt.onnx_util import opset
from rwkv_opt.passes._convert import BFLOAT16
from rwkv_opt.passes._precision import (
    MIXED_SCOPES,
    IoDtype,
    Policy,
    PrecisionConfig,
    PrecisionPass,
    coerce_enum,
    mixed_precision_meta,
)
from rwkv_opt.passes.base import register
from rwkv_opt.passes.ep_kernels import bf16_ops


@dataclass(frozen=True)
class Bf16Config(PrecisionConfig):
    """io_dtype: fp32 (default) or bf16; provider: the EP whose bf16 kernel table decides the islands."""

    provider: Provider = Provider.CUDA

    def __post_init__(self):
        super().__post_init__()
        coerce_enum(self, "provider", Provider)


@register
class Bf16(PrecisionPass):
    name = "bf16"
    Config = Bf16Config
    description = "bf16 like fp16_mixed, with fp32 islands for ops the target EP has no bf16 kernel for"
    mode_name = Precision.BF16.value
    allowed_io = (IoDtype.FP32, IoDtype.BF16)

    def requires(self, model: onnx.ModelProto) -> str | None:
        reason = super().requires(model)
        if reason:
            return reason
        if "MatMul" not in bf16_ops(self.config.provider, opset(model)):
            return (
                f"the {self.config.provider.value} EP has no bf16 MatMul kernel (ORT's CPU EP has no bf16 "
                "arithmetic at all); use fp16_mixed, or provider cuda"
            )
        return None

    def policy(self, model: onnx.ModelProto) -> Policy:
        table = bf16_ops(self.config.provider, opset(model))
        return Policy(
            low=BFLOAT16,
            fp32_scopes=MIXED_SCOPES,
            low_ops=table,
            io_low=self.config.io_dtype is IoDtype.BF16,
            ln_stash_fp32=True,
        )

    def precision_meta(self, policy: Policy) -> dict:
        io = "bf16" if policy.io_low else "fp32"
        return {**mixed_precision_meta(self.mode_name, "bf16", "bf16", io), "provider": self.config.provider.value}
