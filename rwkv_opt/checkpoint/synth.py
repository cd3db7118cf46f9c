"""Synthetic RWKV-7(a) checkpoints with the real key names and shapes.

Values follow the official init scheme (RWKV-LM `RWKV-v7/train_temp/src/model.py`: token-shift
mixes 1 - (c/C)^p, decay speeds -7 + 5 (c/C)^(0.85 + sqrt(layer ratio)), k_k = 0.85, k_a = 1,
ln_x weights ((1+i)/L)^0.7, orthogonal-scale projections) plus perturbations, so that every path
carries signal: no matrix is zero (train_temp zero-inits output, w1, a1, v1, g1, ffn.value, r_k),
and the head is scaled so the logits have std ~2.5.

Each tensor is generated on first access from (seed, key) alone, so the result does not depend
on key order, and writing a 2.9B preset holds one tensor in memory at a time.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np

from rwkv_opt.config import ModelConfig, Variant, expected_shapes
from rwkv_opt.errors import RwkvOptError

LOGIT_STD = 2.5


def _preset(L, C, V, dw, da, dv, dg) -> ModelConfig:
    return ModelConfig(
        n_layer=L, n_embd=C, head_size=64, vocab=V, dim_ffn=4 * C, d_decay=dw, d_aaa=da, d_mv=dv, d_gate=dg
    )


PRESETS: dict[str, ModelConfig] = {
    "tiny": _preset(2, 128, 1024, 16, 16, 8, 32),
    "0.1b": _preset(12, 768, 65536, 64, 64, 32, 128),
    "0.4b": _preset(24, 1024, 65536, 64, 64, 32, 128),
    "1.5b": _preset(24, 2048, 65536, 96, 96, 64, 256),
    "2.9b": _preset(32, 2560, 65536, 96, 96, 64, 320),
    "7.2b": _preset(32, 4096, 65536, 128, 128, 96, 480),  # LoRA ranks by RWKV-LM's sizing rule
}


def preset_config(name: str, deepembed: bool = False) -> ModelConfig:
    if name not in PRESETS:
        raise RwkvOptError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}.")
    cfg = PRESETS[name]
    if deepembed:  # the official runtime views s_emb rows as 32 x 32
        cfg = replace(cfg, variant=Variant.RWKV7A, d_semb=1024, d_srank=32)
    return cfg


@dataclass
class SyntheticStateDict(Mapping):
    """A lazy, deterministic state dict: key -> array (fp32, or bf16 when dtype='bf16')."""

    config: ModelConfig
    seed: int = 0
    dtype: str = "bf16"

    def __post_init__(self):
        self._shapes = expected_shapes(self.config)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._shapes:
            raise KeyError(key)
        a = _make(self.config, key, self._shapes[key], self._rng(key)).astype(np.float32)
        if self.dtype == "bf16":
            return a.astype(ml_dtypes.bfloat16)
        if self.dtype == "fp16":
            return a.astype(np.float16)
        return a

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self):
        return len(self._shapes)

    def shape(self, key: str) -> tuple:
        return self._shapes[key]

    def spec(self, key: str) -> tuple[np.dtype, tuple]:
        """(dtype, shape) without making the tensor: write_pth streams a lazy dict one tensor at a time."""
        dtype = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16}.get(self.dtype, np.float32)
        return np.dtype(dtype), tuple(self._shapes[key])

    def _rng(self, key: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(key.encode())])

    def materialize(self) -> dict[str, np.ndarray]:
        return {k: self[k] for k in self}


def _make(cfg: ModelConfig, key: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """One tensor of the official init, perturbed (see module docstring)."""
    C, L = cfg.n_embd, cfg.n_layer
    layer = int(key.split(".")[1]) if key.startswith("blocks.") else 0
    r01 = layer / max(L - 1, 1)
    r1a0 = 1.0 - layer / L
    ddd = np.arange(C) / C
    name = key.split(".", 2)[-1] if key.startswith("blocks.") else key
    noise = lambda scale: rng.standard_normal(shape) * scale  # noqa: E731

    mix_pow = {"att.x_r": 0.2, "att.x_w": 0.9, "att.x_k": 0.7, "att.x_v": 0.7, "att.x_a": 0.9, "att.x_g": 0.2}
    if name in mix_pow:
        return (1.0 - ddd ** (mix_pow[name] * r1a0)).reshape(shape) + noise(0.05)
    if name == "ffn.x_k":
        return (1.0 - ddd ** (r1a0**4)).reshape(shape) + noise(0.05)
    if name == "att.w0":
        speed = -7 + 5 * (np.arange(C) / max(C - 1, 1)) ** (0.85 + 1.0 * r01**0.5)
        return (speed + 0.5).reshape(shape) + noise(0.3)
    if name in ("att.a0", "att.v0"):
        return noise(0.5) + (1.0 if name == "att.v0" else 0.0)
    if name == "att.k_k":
        return 0.85 + noise(0.05)
    if name == "att.k_a":
        return 1.0 + noise(0.05)
    if name == "att.r_k":
        return noise(0.3)
    if name.endswith("ln_x.weight"):
        return ((1 + layer) / L) ** 0.7 + noise(0.05)
    if name.endswith(".weight") and name.split(".")[-2] in ("ln0", "ln1", "ln2", "ln_out"):
        return 1.0 + noise(0.1)
    if name.endswith(".bias"):
        return noise(0.05)
    if name[-2:] in ("w1", "a1", "v1", "g1") and name.startswith("att."):
        return noise(1.0 / np.sqrt(shape[0]))
    if name[-2:] in ("w2", "a2", "v2", "g2") and name.startswith("att."):
        return noise(0.3 / np.sqrt(shape[0]))
    if name in ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight"):
        return noise(1.0 / np.sqrt(C))
    if name == "ffn.key.weight":
        return noise(1.0 / np.sqrt(C))
    if name == "ffn.value.weight":
        return noise(0.5 / np.sqrt(shape[1]))
    if name == "emb.weight":
        return rng.uniform(-1.0, 1.0, shape)
    if name == "head.weight":  # LN output has rms ~1 per channel: logit std = sqrt(C) * std(W)
        return noise(LOGIT_STD / np.sqrt(C))
    if name == "ffn.s_emb.weight":
        return noise(1.0 / np.sqrt(cfg.d_srank))
    if name == "ffn.s_emb_x.weight":
        return noise(0.3 / np.sqrt(C))
    if name == "ffn.s1":
        return noise(1.0 / np.sqrt(C))
    if name == "ffn.s2":
        return noise(0.3 / np.sqrt(shape[0]))
    if name == "ffn.s0":
        return 1.0 + noise(0.1)
    raise KeyError(f"no synthetic rule for {key}")


def synthetic_state_dict(
    preset: str = "tiny", *, deepembed: bool = False, seed: int = 0, dtype: str = "bf16"
) -> SyntheticStateDict:
    if dtype not in ("bf16", "fp16", "fp32"):
        raise RwkvOptError(f"unknown dtype '{dtype}'; choose bf16, fp16 or fp32.")
    return SyntheticStateDict(preset_config(preset, deepembed), seed=seed, dtype=dtype)
