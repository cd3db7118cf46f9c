"""Model configuration derived from tensor shapes, and the enums shared across the package.

Every dimension comes from the checkpoint's shapes (never from a file name):
C = n_embd, N = head_size, H = n_head = C / N, F = ffn dim, V = vocab, L = n_layer.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

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


_BLOCK = re.compile(r"^blocks\.(0|[1-9]\d{0,8})\.")  # a canonical index below 10^9 (int() of 5,000 digits raises)
_DIM_NAMES = {  # key -> names of its dimensions, for the keys config_from_shapes reads dimensions from
    "emb.weight": ("vocab", "n_embd"),
    "blocks.0.att.r_k": ("n_head", "head_size"),
    "blocks.0.ffn.key.weight": ("dim_ffn", "n_embd"),
    "blocks.0.ffn.s_emb.weight": ("vocab", "d_semb"),
}


def _dims(shapes: Mapping[str, tuple], key: str, source: str) -> tuple[int, ...]:
    """The shape of ``key``, refused unless it has the expected rank and no dimension below 1."""
    names = _DIM_NAMES.get(key, ("n_embd", "rank"))  # the others are LoRA down-projections (C, d)
    shape = tuple(shapes[key])
    if len(shape) != len(names) or min(shape) < 1:
        raise CheckpointError(
            f"{source}: '{key}' has shape {shape}; an RWKV-7 checkpoint has it "
            f"{len(names)}-D ({', '.join(names)}), every dimension at least 1."
        )
    return shape


def _n_layer(shapes: Mapping[str, tuple], source: str) -> int:
    """1 + the largest block index, refused when any block below it has no key at all.

    The first gap is found by counting up from 0, never by building range(n_layer): one stray key
    ``blocks.100000000.att.x_r`` must cost as little as any other key.
    """
    layers = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
    n_layer = max(layers) + 1
    gap = next(i for i in range(n_layer + 1) if i not in layers)
    if gap < n_layer:
        raise CheckpointError(f"{source} has blocks up to {n_layer - 1} but none for block {gap}.")
    return n_layer


def config_from_shapes(shapes: Mapping[str, tuple], source: str = "checkpoint") -> ModelConfig:
    """Derive the ModelConfig from a name -> shape mapping (raises CheckpointError).

    Each dimension read here is checked for rank and for being at least 1, so a 1-D emb or a vocab
    of 0 is one sentence here rather than an exception deep in the graph builder.
    """
    gen = detect_generation(shapes)
    if gen is not None:
        raise CheckpointError(f"{source}: this is an {gen} checkpoint; rwkv-opt supports RWKV-7 (and RWKV-7a).")
    for key in ("emb.weight", "blocks.0.att.r_k", "blocks.0.ffn.key.weight", "blocks.0.att.w1"):
        if key not in shapes:
            raise CheckpointError(f"{source} has no '{key}': it is not an RWKV-7 state dict.")
    V, C = _dims(shapes, "emb.weight", source)
    H, N = _dims(shapes, "blocks.0.att.r_k", source)
    if H * N != C:
        raise CheckpointError(
            f"{source}: blocks.0.att.r_k has shape {tuple(shapes['blocks.0.att.r_k'])}, "
            f"but n_head * head_size must equal n_embd = {C}."
        )
    L = _n_layer(shapes, source)
    v_layer = 1 if L > 1 else 0

    def rank(key: str) -> int:  # a LoRA's inner width, 0 when the file has no such LoRA
        return _dims(shapes, key, source)[1] if key in shapes else 0

    deep = "blocks.0.ffn.s_emb.weight" in shapes
    return ModelConfig(
        n_layer=L,
        n_embd=C,
        head_size=N,
        vocab=V,
        dim_ffn=_dims(shapes, "blocks.0.ffn.key.weight", source)[0],
        d_decay=rank("blocks.0.att.w1"),
        d_aaa=rank("blocks.0.att.a1"),
        d_mv=rank(f"blocks.{v_layer}.att.v1"),
        d_gate=rank("blocks.0.att.g1"),
        variant=Variant.RWKV7A if deep else Variant.RWKV7,
        d_semb=_dims(shapes, "blocks.0.ffn.s_emb.weight", source)[1] if deep else 0,
        d_srank=rank("blocks.0.ffn.s1") if deep else 0,
    )


def _top_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    C, V = cfg.n_embd, cfg.vocab
    return {
        "emb.weight": (V, C),
        "blocks.0.ln0.weight": (C,),
        "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,),
        "ln_out.bias": (C,),
        "head.weight": (V, C),
    }


def _block_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple]:
    """Every key of block ``i`` with its shape."""
    C, V, F, H, N = cfg.n_embd, cfg.vocab, cfg.dim_ffn, cfg.n_head, cfg.head_size
    p, s = f"blocks.{i}.", {}
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


def iter_expected(cfg: ModelConfig) -> Iterator[dict[str, tuple]]:
    """The keys of ``expected_shapes`` in groups: the top-level ones, then one block at a time, so a
    check can stop at the first missing key without building all n_layer blocks' names."""
    yield _top_shapes(cfg)
    for i in range(cfg.n_layer):
        yield _block_shapes(cfg, i)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Every key an RWKV-7(a) state dict of this config must have, with its shape."""
    return {k: v for group in iter_expected(cfg) for k, v in group.items()}


# Keys whose rank varies between releases (squeezed on load): compare element counts only.
SQUEEZABLE = re.compile(r"\.(x_[rwkvag]|w0|a0|v0|k_k|k_a|s0)$")
