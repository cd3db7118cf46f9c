"""PrecisionPass: the shared shape of fp16_mixed, fp16 and bf16. A subclass names a `Policy`; the
base checks the model is an fp32 rwkv-opt model, converts it (passes/_convert.py), proves the fp32
WKV state path afterwards (passes/_state_path.py) and records the precision in the metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import onnx

from rwkv_opt.graph.contract import Key, Meta
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph.contract import Scope as S
from rwkv_opt.graph.contract import scope_path
from rwkv_opt.passes._convert import LOW_TYPES, NP_NAME, IoDtype, Policy, convert
from rwkv_opt.passes._state_path import state_path_violations
from rwkv_opt.passes.base import Pass, PassConfig, PassResult, applied_passes, get_meta, mark_applied, set_meta


def model_precision(model: onnx.ModelProto) -> dict:
    return Meta.of(model).precision


def coerce_enum(cfg, name: str, enum_type) -> None:
    """Frozen configs accept the enum's value (targets and the CLI pass strings)."""
    value = getattr(cfg, name)
    try:
        object.__setattr__(cfg, name, enum_type(value))
    except ValueError:
        raise RwkvOptError(
            f"{name} '{value}' is not valid; choose one of: {', '.join(e.value for e in enum_type)}."
        ) from None


class PrecisionPass(Pass):
    """A pass that converts an fp32 rwkv-opt model by a `Policy`; subclasses say which."""

    mode_name: str = ""  # the rwkv_opt.precision "mode", e.g. "fp16-mixed"
    allowed_io: tuple[IoDtype, ...] = (IoDtype.FP32,)

    def policy(self, model: onnx.ModelProto) -> Policy:
        raise NotImplementedError

    def precision_meta(self, policy: Policy) -> dict:
        raise NotImplementedError

    def requires(self, model: onnx.ModelProto) -> str | None:
        if get_meta(model, Key.CONFIG) is None:
            return "model has no rwkv-opt metadata; build it with rwkv_opt.graph.model.build_model or `rwkv-opt build`"
        if self.config.io_dtype not in self.allowed_io:
            return (
                f"io_dtype {self.config.io_dtype.value} is not valid for {self.name}; "
                f"choose {' or '.join(d.value for d in self.allowed_io)}"
            )
        if "quantize" in applied_passes(model):
            return f"model is already quantized; {self.name} converts fp32 models only (run it before quantize)"
        prec = model_precision(model)
        mode = prec.get("mode") or (prec.get("weights") if prec.get("weights") not in (None, "fp32") else None)
        if mode:
            return f"model is already {mode}; {self.name} converts fp32 models only"
        low = [t.name for t in model.graph.initializer if t.data_type in LOW_TYPES]
        if low:
            return (
                f"model already holds low-precision initializers (e.g. {low[0]}); {self.name} converts fp32 models only"
            )
        return None

    def run(self, model: onnx.ModelProto) -> PassResult:
        policy = self.policy(model)
        out, stats = convert(model, policy)
        io = NP_NAME[policy.low] if policy.io_low else "float32"
        set_meta(out, Key.PRECISION, json.dumps(self.precision_meta(policy)))
        set_meta(out, Key.STATE_DTYPES, json.dumps({"x_tmix": io, "wkv": "float32", "x_cmix": io}))
        mark_applied(out, self.name)
        return PassResult(out, True, stats.notes(policy.low))

    def ensures(self, model: onnx.ModelProto) -> str | None:
        bad = state_path_violations(model)
        return f"the fp32 WKV state path: {bad[0]}" if bad else None


@dataclass(frozen=True)
class PrecisionConfig(PassConfig):
    io_dtype: IoDtype = IoDtype.FP32  # dtype of x_tmix/x_cmix state I/O and logits `head`

    def __post_init__(self):
        coerce_enum(self, "io_dtype", IoDtype)


# Kept fp32 by fp16_mixed and bf16: the WKV and the decay, kk-normalize and ln_x statistics feeding it.
MIXED_SCOPES = (
    scope_path(S.WKV),
    scope_path(S.ATT, S.DECAY),
    scope_path(S.ATT, S.NORMALIZE),
    scope_path(S.ATT, S.LN_X),
)


def mixed_precision_meta(mode: str, low: str, activations: str, io: str) -> dict:
    """The rwkv_opt.precision record of fp16_mixed and bf16: weights and matmuls in `low`; the decay, kk
    normalize, norm statistics, GroupNorm and the WKV in fp32; logits and state I/O in `io`."""
    return {
        "mode": mode,
        "weights": low,
        "activations": activations,
        "matmul": low,
        "decay": "fp32",
        "kk_normalize": "fp32",
        "norm_stats": "fp32",
        "group_norm": "fp32",
        "wkv": "fp32",
        "logits": io,
        "state_io": io,
    }
