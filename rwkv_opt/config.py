"""Model configuration derived from tensor shapes, and the enums shared across the package.

Every dimension comes from the checkpoint's shapes (never from a file name):
C = n_embd, N = head_size, H = n_head = C / N, F = ffn dim, V = vocab, L = n_layer.
"""
from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass
from typing import Mapping

from rwkv_opt.errors import CheckpointError


class Variant(str, enum.Enum):
    RWKV7 = "rwkv7"
    RWKV7A = "rwkv7a"  # DeepEmbed


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16_MIXED = "fp16-mixed"
    FP16 = "fp16"
    BF16 = "bf16"


class Provider(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"

    @property
    def ort_name(self) -> str:
        return {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[self.value]


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int
    n_embd: int
    head_size: int
    vocab: int
    dim_ffn: int
    d_decay: int  # LoRA ranks: w, a, v, g
    d_aaa: int
    d_mv: int
    d_gate: int
    variant: Variant = Variant.RWKV7
    d_semb: int = 0  # DeepEmbed: s_emb width (1024) and its square root (32)
    d_srank: int = 0

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def deepembed(self) -> bool:
        return self.variant is Variant.RWKV7A

    def n_params(self) -> int:
        C, V, L = self.n_embd, self.vocab, self.n_layer
        lora = 2 * C * (self.d_decay + self.d_aaa + self.d_mv + self.d_gate)
        per_layer = 19 * C + 4 * C * C + 2 * C * self.dim_ffn + lora
        if self.deepembed:
            per_layer += V * self.d_semb + self.d_semb * C + C * self.d_srank
            per_layer += self.d_srank * self.dim_ffn + self.dim_ffn
        return 2 * V * C + 4 * C + L * per_layer

    def to_dict(self) -> dict:
        d = asdict(self)
        d["variant"] = self.variant.value
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelConfig":
        d = dict(d)
        d["variant"] = Variant(d["variant"])
        return cls(**d)


_OLDER_RWKV = [  # (key suffix that only that generation has, generation name)
    ("att.time_maa_x", "RWKV-6"),
    ("att.time_faaaa", "RWKV-5"),
    ("att.time_first", "RWKV-4"),
]


def detect_generation(keys) -> str | None:
    """Return e.g. 'RWKV-6' for an older RWKV state dict, None when it looks like RWKV-7."""
    keys = set(keys)
    for suffix, name in _OLDER_RWKV:
        if any(k.endswith(suffix) for k in keys):
            return name
    return None


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def config_from_shapes(shapes: Mapping[str, tuple], source: str = "checkpoint") -> ModelConfig:
    """Derive the ModelConfig from a name -> shape mapping (raises CheckpointError)."""
    gen = detect_generation(shapes)
    if gen is not None:
        raise CheckpointError(f"{source}: this is an {gen} checkpoint; rwkv-opt supports RWKV-7 (and RWKV-7a).")
    for key in ("emb.weight", "blocks.0.att.r_k", "blocks.0.ffn.key.weight", "blocks.0.att.w1"):
        if key not in shapes:
            raise CheckpointError(f"{source} has no '{key}': it is not an RWKV-7 state dict.")
    V, C = shapes["emb.weight"]
    H, N = shapes["blocks.0.att.r_k"]
    if H * N != C:
        raise CheckpointError(f"{source}: blocks.0.att.r_k has shape {tuple(shapes['blocks.0.att.r_k'])}, "
                              f"but n_head * head_size must equal n_embd = {C}.")
    layers = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
    L = max(layers) + 1
    missing = sorted(set(range(L)) - layers)
    if missing:
        raise CheckpointError(f"{source} has blocks up to {L - 1} but none for block {missing[0]}.")
    v_layer = 1 if L > 1 else 0
    deep = "blocks.0.ffn.s_emb.weight" in shapes
    return ModelConfig(
        n_layer=L, n_embd=C, head_size=N, vocab=V,
        dim_ffn=shapes["blocks.0.ffn.key.weight"][0],
        d_decay=shapes["blocks.0.att.w1"][1],
        d_aaa=shapes["blocks.0.att.a1"][1] if "blocks.0.att.a1" in shapes else 0,
        d_mv=shapes[f"blocks.{v_layer}.att.v1"][1] if f"blocks.{v_layer}.att.v1" in shapes else 0,
        d_gate=shapes["blocks.0.att.g1"][1] if "blocks.0.att.g1" in shapes else 0,
        variant=Variant.RWKV7A if deep else Variant.RWKV7,
        d_semb=shapes["blocks.0.ffn.s_emb.weight"][1] if deep else 0,
        d_srank=shapes["blocks.0.ffn.s1"][1] if deep and "blocks.0.ffn.s1" in shapes else 0,
    )


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Every key an RWKV-7(a) state dict of this config must have, with its shape."""
    C, V, F, H, N = cfg.n_embd, cfg.vocab, cfg.dim_ffn, cfg.n_head, cfg.head_size
    s = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
         "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2", "att.ln_x"):
            s[p + ln + ".weight"] = (C,)
            s[p + ln + ".bias"] = (C,)
        for m in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            s[p + "att." + m] = (1, 1, C)
        for name, d in (("w", cfg.d_decay), ("a", cfg.d_aaa), ("v", cfg.d_mv), ("g", cfg.d_gate)):
            s[p + f"att.{name}1"] = (C, d)
            s[p + f"att.{name}2"] = (d, C)
        s[p + "att.r_k"] = (H, N)
        for lin in ("receptance", "key", "value", "output"):
            s[p + f"att.{lin}.weight"] = (C, C)
        s[p + "ffn.x_k"] = (1, 1, C)
        s[p + "ffn.key.weight"] = (F, C)
        s[p + "ffn.value.weight"] = (C, F)
        if cfg.deepembed:
            r = cfg.d_srank
            s[p + "ffn.s_emb.weight"] = (V, cfg.d_semb)
            s[p + "ffn.s_emb_x.weight"] = (cfg.d_semb, C)
            s[p + "ffn.s1"] = (C, r)
            s[p + "ffn.s2"] = (r, F)
            s[p + "ffn.s0"] = (1, 1, F)
    return s


# Keys whose rank varies between releases (squeezed on load): compare element counts only.
SQUEEZABLE = re.compile(r"\.(x_[rwkvag]|w0|a0|v0|k_k|k_a|s0)$")
