"""fp16: everything that can be fp16 is fp16 (decay, kk normalize and norms too); only the WKV
and its state stay fp32. A comparison point that shows what fp16_mixed's fp32 islands buy.

before -> after: as fp16_mixed, except that /att/decay/, /att/normalize/ and /att/ln_x/ run in
fp16 (w = exp(-e^-0.5 sigmoid(.)) is rounded to fp16 before the fp32 WKV reads it) and
LayerNormalization keeps its own stash_type (the ONNX default: fp32 statistics).
The WKV (Scan or fuse_wkv's If) is never entered; its inputs are cast to fp32 just before it and
wkv_state_i -> wkv_next_i stays fp32 (proven before returning).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from rwkv_opt.config import Precision
from rwkv_opt.passes._convert import FLOAT16, WKV_SCOPE
from rwkv_opt.passes._precision import IoDtype, Policy, PrecisionConfig, PrecisionPass
from rwkv_opt.passes.base import register


@dataclass(frozen=True)
class Fp16Config(PrecisionConfig):
    """io_dtype: fp32 (default) or fp16 for the x_tmix/x_cmix state I/O and the logits."""


@register
class Fp16(PrecisionPass):
    name = "fp16"
    Config = Fp16Config
    description = "fp16 everywhere except the WKV and its state (comparison point for fp16_mixed)"
    mode_name = Precision.FP16.value
    allowed_io = (IoDtype.FP32, IoDtype.FP16)

    def policy(self, model: onnx.ModelProto) -> Policy:
        return Policy(low=FLOAT16, fp32_scopes=(WKV_SCOPE,), io_low=self.config.io_dtype is IoDtype.FP16)

    def precision_meta(self, policy: Policy) -> dict:
        io = "fp16" if policy.io_low else "fp32"
        return {
            "mode": self.mode_name,
            "weights": "fp16",
            "activations": "fp16",
            "matmul": "fp16",
            "decay": "fp16",
            "kk_normalize": "fp16",
            "norm_stats": "fp32",
            "group_norm": "fp16",
            "wkv": "fp32",
            "logits": io,
            "state_io": io,
        }
