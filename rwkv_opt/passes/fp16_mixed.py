"""fp16_mixed: fp16 weights and matmuls, with the numerically fragile parts kept fp32.

before -> after (per layer; `=` fp32, `~` fp16):
    ~ LN1 (fp32 statistics: stash_type=1) ~ token shift ~ lerps ~ r/k/v/a/gate/v_mix matmuls
    = decay:  Cast(xw) -> w1 -> tanh -> w2 -> + w0 -> sigmoid -> exp      (the whole /att/decay/ scope)
    = l2-normalize of kk                                                   (/att/normalize/)
    = WKV (Scan or fuse_wkv's If, never entered): r, w, k, v, kk, b cast to fp32 just before it;
      its state wkv_state_i -> wkv_next_i fp32 end to end                  (/wkv/)
    = GroupNorm ln_x on the fp32 WKV output                                (/att/ln_x/)
    ~ bonus, output matmul, LN2, channel mix, residual stream, ln_out, head matmul
    logits `head` and the x_tmix/x_cmix state I/O: fp32 (Cast at the boundary) or fp16 (io_dtype).
elementwise = fp32 (autocast style): only the MatMuls (and the embedding Gather) run fp16; every
    other op runs fp32, with a Cast on each side of each MatMul. Same weight bytes; measured
    (benchmarks/precision_accuracy.py, 0.1B, GPU-like rounding; reports/precision-0.1b.md):
    max|err|/std 9.5e-3 -> 6.6e-3 (4.9e-3 after the first position), mean KL 8.8e-6 -> 3.4e-6, for
    ~2 more Cast kernels per MatMul (launch overhead on a GPU at decode, not measured: no GPU).

Constraints: the input is an fp32 rwkv-opt model (refused otherwise); w0, w1, w2 stay fp32
initializers; every other weight read only by fp16 nodes is stored fp16 under its own name.
The postcondition (no fp16 on the WKV state path, WKV inputs fp32) is proven before returning.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import onnx

from rwkv_opt.config import Precision
from rwkv_opt.passes._convert import FLOAT16
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


class Elementwise(str, enum.Enum):
    FP16 = "fp16"  # everything outside the fp32 scopes runs fp16 (fewest Casts)
    FP32 = "fp32"  # only MatMul and the embedding Gather run fp16


@dataclass(frozen=True)
class Fp16MixedConfig(PrecisionConfig):
    """io_dtype: fp32 (default) or fp16 for the x_tmix/x_cmix state I/O and the logits.
    elementwise: fp16 (default) or fp32 for every op but MatMul and the embedding Gather."""

    elementwise: Elementwise = Elementwise.FP16

    def __post_init__(self):
        super().__post_init__()
        coerce_enum(self, "elementwise", Elementwise)


@register
class Fp16Mixed(PrecisionPass):
    name = "fp16_mixed"
    Config = Fp16MixedConfig
    description = "fp16 weights and matmuls; decay, kk normalize, norms' statistics, WKV and its state fp32"
    mode_name = Precision.FP16_MIXED.value
    allowed_io = (IoDtype.FP32, IoDtype.FP16)

    def policy(self, model: onnx.ModelProto) -> Policy:
        low_ops = frozenset({"MatMul", "Gather"}) if self.config.elementwise is Elementwise.FP32 else None
        return Policy(
            low=FLOAT16,
            fp32_scopes=MIXED_SCOPES,
            io_low=self.config.io_dtype is IoDtype.FP16,
            ln_stash_fp32=True,
            low_ops=low_ops,
        )

    def precision_meta(self, policy: Policy) -> dict:
        io = "fp16" if policy.io_low else "fp32"
        act = self.config.elementwise.value
        return mixed_precision_meta(self.mode_name, "fp16", act, io)
