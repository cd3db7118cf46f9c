"""Named targets: data, not code paths. A target names its provider, precision policy, the
passes that make it (in order, with config overrides), session settings and its accuracy budget.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from rwkv_opt.config import Precision, Provider
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph.model import LogitsMode
from rwkv_opt.passes.quantize import DEEPEMBED_GLOB, LORA_GLOBS, WKV_GLOB


TOP1_ALPHA = 0.05  # a verification refuses top-1 when agreement this low has under 5% probability


@dataclass(frozen=True)
class Budget:
    """Accuracy an artifact must keep vs the fp32 numpy reference (teacher-forced protocol).

    max_rel_err and max_kl are hard limits. min_top1 is a rate, and a verification sees a sample of
    positions (`pipeline` checks 33), where 98% cannot be told from 97% -- with 9 positions one flip
    is 89%. So a sample fails top-1 when it is evidence that the rate is below min_top1: agreement
    this low or lower would have under TOP1_ALPHA probability if the rate were exactly min_top1
    (one-sided exact binomial test). min_top1 = 1.0 still refuses any flip.
    """

    min_top1: float
    max_rel_err: float
    max_kl: float

    def top1_p_value(self, hits: int, positions: int) -> float:
        """P(X <= hits) for X ~ Binomial(positions, min_top1)."""
        p, n = self.min_top1, positions
        if p >= 1.0:
            return 1.0 if hits >= n else 0.0
        return min(1.0, sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(hits + 1)))

    def failures(self, top1: float, positions: int, max_rel_err: float, mean_kl: float) -> list[str]:
        """What a measurement misses, one phrase each; empty when it is within the budget."""
        hits = round(top1 * positions)
        p, out = self.top1_p_value(hits, positions), []
        if p < TOP1_ALPHA:
            out.append(f"top-1 {hits}/{positions} (p = {p:.3f} that a {self.min_top1:.0%} rate agrees this little)")
        if not max_rel_err <= self.max_rel_err:
            out.append(f"max|err|/std {max_rel_err:.2e} > {self.max_rel_err}")
        if not mean_kl <= self.max_kl:
            out.append(f"mean KL {mean_kl:.2e} > {self.max_kl}")
        return out


@dataclass(frozen=True)
class Target:
    name: str
    provider: Provider
    precision: Precision
    passes: tuple[tuple[str, dict], ...]
    budget: Budget
    description: str
    quantization: str = "none"
    logits: LogitsMode = LogitsMode.LAST

    @property
    def pass_names(self) -> list[str]:
        return [p for p, _ in self.passes]

    def with_wkv_op(self) -> "Target":
        """This target with fuse_wkv in mode=function: one rwkv7.WKV7 node per layer."""
        if "fuse_wkv" not in self.pass_names:
            raise RwkvOptError(
                f"target {self.name} has no fuse_wkv pass, so --wkv-op has nothing to change; "
                "use a target that lists fuse_wkv (rwkv-opt targets)."
            )
        passes = tuple((n, {**c, "mode": "function"}) if n == "fuse_wkv" else (n, c) for n, c in self.passes)
        return dataclasses.replace(self, passes=passes)


FP32_BUDGET = Budget(min_top1=1.0, max_rel_err=1e-4, max_kl=1e-8)
# Gates, not goals: measured on the 0.1B synthetic shape (benchmarks/precision_accuracy.py,
# reports/precision-0.1b.md) fp16-mixed gives top-1 100%, KL 1e-6 and max|err|/std 4.9e-3 on ORT CPU
# (its worst position is the first token from a zero state) and top-1 99.6%, KL 8.8e-6, 9.5e-3 under
# GPU-like rounding (the official package at 'cpu fp16': 99.6%, 9.3e-6, 2.0e-2); emulated bf16 gives
# top-1 95%, KL 6e-4, max|err|/std 8.7e-2.
FP16_BUDGET = Budget(min_top1=0.99, max_rel_err=1e-2, max_kl=1e-4)
BF16_BUDGET = Budget(min_top1=0.93, max_rel_err=0.15, max_kl=2e-3)

_FAST = (("fuse_wkv", {}), ("simplify", {}))

# Weight quantization (passes/quantize.py; choices measured in reports/quantization.md). The budgets are
# the accuracy goals of reports/quantization.md ("The goals, and how far each one is"; docs/precision.md);
# max|err|/std sits ~3x above the 0.1B measurement (a tail statistic). The
# synthetic 0.1B's logits are flat (its reference's median top-1 probability is under 3%): all three
# miss top-1 there (KL is met), so `pipeline` refuses them on that model. On a 0.1B trained here
# (benchmarks/trained_accuracy.py: median top-1 probability 9% on held-out text) all three meet
# every budget: int8 top-1 99.0%, KL 2.7e-4 over 193 positions, and `pipeline` accepts them.
INT8_BUDGET = Budget(min_top1=0.98, max_rel_err=0.5, max_kl=0.02)
INT4_BUDGET = Budget(min_top1=0.90, max_rel_err=3.0, max_kl=0.1)
_FLOAT_ONLY = (WKV_GLOB, DEEPEMBED_GLOB)  # what stays float once the LoRAs are quantized
# The time-mix LoRAs (decay, a, gate, v_mix) as DynamicQuantizeMatMul, per-column int8 weights: in fp32 they
# were 17% of the bytes a cpu-int4 decode step read (20 of 118 MiB, 0.1B) for 3% of the parameters. As
# DynamicQuantizeMatMul rather than 8-bit MatMulNBits (block 32): MLAS's u8s8 GEMM runs M = 512 about 3.5x
# faster than MatMulNBits there (768 x 3072: 2.5 vs 9.0 ms), so prefill gains where MatMulNBits lost it.
# Measured (0.1B, Intel Xeon, 2 threads, reports/decode.md "Session 7"): cpu-int8 decode 0.935x, prefill
# 1.050x, KL 2.24e-3 -> 2.29e-3; cpu-int4 (with its FFN key, then 8-bit MatMulNBits) decode 1.006x, prefill
# 1.153x, KL 8.073e-2 -> 8.078e-2.
_LORA_INT8 = tuple((g, "int8") for g in LORA_GLOBS)
_INT8 = ("quantize", {"scheme": "int8", "exclude": _FLOAT_ONLY})
# The FFN at 8 bits (DynamicQuantizeMatMul): each FFN matrix at 4 bits cost ~12x the KL of an attention one,
# and 4-bit MatMulNBits at M = 512 is ~4.5x slower than DynamicQuantizeMatMul (3072 x 768: 11.9 vs 2.4 ms), so
# the FFN value at int8 lifts prefill as well as accuracy (0.1B, GPTQ: KL 8.08e-2 -> 5.69e-2, top-1 67.9% ->
# 73.6%) for 10 MiB (0.174x -> 0.187x of fp32). The embedding at block 64 keeps the artifact under 0.2x.
_INT4 = (
    "quantize",
    {
        "scheme": "nbits4",
        "block_size": 32,
        "algorithm": "gptq",
        "embedding": "nbits4",
        "exclude": _FLOAT_ONLY,
        "overrides": (("*/ffn/MatMul*", "int8"), ("/emb", "nbits4", 64), *_LORA_INT8),
    },
)
_INT4_CUDA = ("quantize", {"scheme": "nbits4", "block_size": 32, "algorithm": "gptq"})

TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target(
            "cpu-fp32",
            Provider.CPU,
            Precision.FP32,
            _FAST,
            FP32_BUDGET,
            "fp32 on the ORT CPU EP: chunked-WKV prefill, direct-step decode",
        ),
        Target("cuda-fp32", Provider.CUDA, Precision.FP32, _FAST, FP32_BUDGET, "fp32 on the CUDA EP"),
        Target(
            "cuda-fp16",
            Provider.CUDA,
            Precision.FP16_MIXED,
            (("fp16_mixed", {}),) + _FAST,
            FP16_BUDGET,
            "fp16 weights and matmuls; decay, WKV state, norms and logits kept fp32",
        ),
        Target(
            "cuda-bf16",
            Provider.CUDA,
            Precision.BF16,
            (("bf16", {"provider": "cuda"}),) + _FAST,
            BF16_BUDGET,
            "bf16 like fp16-mixed, with fp32 islands for ops the CUDA EP has no bf16 kernel for",
        ),
        Target(
            "cpu-int8",
            Provider.CPU,
            Precision.FP32,
            _FAST + (_INT8,),
            INT8_BUDGET,
            "int8 per-column weights, dynamic uint8 activations (DynamicQuantizeMatMul) on the projections and LoRAs",
            quantization="int8-dynamic",
        ),
        Target(
            "cpu-int4",
            Provider.CPU,
            Precision.FP32,
            _FAST + (_INT4,),
            INT4_BUDGET,
            "4-bit MatMulNBits (block 32, GPTQ, int8 compute) on r/k/v/o and the head; FFN and LoRAs int8 "
            "(DynamicQuantizeMatMul); 4-bit embedding; WKV fp32",
            quantization="nbits4-b32-gptq",
        ),
        Target(
            "cuda-int4",
            Provider.CUDA,
            Precision.FP16_MIXED,
            (("fp16_mixed", {}),) + _FAST + (_INT4_CUDA,),
            INT4_BUDGET,
            "fp16-mixed with 4-bit MatMulNBits (block 32, GPTQ) on the big projections",
            quantization="nbits4-b32-gptq",
        ),
    ]
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise RwkvOptError(f"unknown target '{name}'; choose one of: {', '.join(TARGETS)} (see `rwkv-opt targets`).")
    return TARGETS[name]


def runnable_here(target: Target) -> str | None:
    """Why this machine cannot RUN the target's artifacts (None when it can)."""
    from rwkv_opt.runtime import available_providers

    if target.provider not in available_providers():
        return (
            f"target {target.name} needs the {target.provider.ort_name}, which this onnxruntime lacks; "
            "install onnxruntime-gpu on a CUDA machine, or use a cpu-* target here"
        )
    if target.provider is Provider.CPU and target.precision is Precision.BF16:
        return "ORT's CPU EP has no bf16 kernels; use cuda-bf16 on a GPU, or cpu-fp32 here"
    return None
