"""Weights: a validated RWKV-7(a) state dict plus its ModelConfig, with the load-time folding.

Tensors stay as they came (often zero-copy bf16 views of a memory-mapped file) until a
consumer asks for one in a float dtype; conversion then happens one tensor at a time, so a
2.9B bf16 file never needs two float copies of itself in memory.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from rwkv_opt.checkpoint.bounds import check_sizes, excerpt, require_finite
from rwkv_opt.checkpoint.torchzip import open_pth, release_pages
from rwkv_opt.config import SQUEEZABLE, ModelConfig, config_from_shapes, iter_expected
from rwkv_opt.errors import CheckpointError

LN_EPS = 1e-5
# Layer 0 computes v_first itself: its v0/v1/v2 are unused and some files omit them.
_OPTIONAL = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}


@dataclass
class Weights:
    """A validated state dict. `raw` maps key -> array in the checkpoint's own dtype."""

    raw: Mapping[str, np.ndarray]
    config: ModelConfig
    source: str = "synthetic"
    digest: str = ""
    layout: str = "synthetic"  # pth, safetensors, hf (checkpoint.layouts) or synthetic
    tokenizer: dict = field(default_factory=dict)  # what layouts.folder_tokenizer/file_tokenizer found
    _cache: dict = field(default_factory=dict, repr=False)

    def f32(self, key: str, dtype=np.float32) -> np.ndarray:
        """The tensor as float (squeezed for the [1,1,C] vectors)."""
        src = self.raw[key]
        a = np.asarray(src)
        if SQUEEZABLE.search(key):
            a = a.reshape(-1)
        out = a.astype(dtype)
        if isinstance(src, np.ndarray):
            release_pages(src)  # a mapped checkpoint's pages leave the RSS once converted
        return out

    def emb_ln0(self, dtype=np.float32) -> np.ndarray:
        """emb <- LayerNorm(emb; blocks.0.ln0), folded once (as the official package does)."""
        key = ("emb_ln0", np.dtype(dtype).str)
        if key not in self._cache:
            w, b = self.f32("blocks.0.ln0.weight", dtype), self.f32("blocks.0.ln0.bias", dtype)
            src = np.asarray(self.raw["emb.weight"])
            out = np.empty(src.shape, dtype)
            step = max(1, (64 << 20) // max(1, src.shape[1] * 8))  # rows per piece: temporaries stay small
            for r in range(0, src.shape[0], step):  # row-wise, so the same values as in one piece
                out[r : r + step] = layer_norm(src[r : r + step].astype(dtype), w, b)
            release_pages(src)
            self._cache[key] = out
        return self._cache[key]

    def manifest_source(self) -> dict:
        """The manifest's "source" block: where the weights came from, in which layout, with which tokenizer."""
        return {
            "path": self.source,
            "digest": self.digest or "synthetic",
            "layout": self.layout,
            "tokenizer": self.tokenizer,
            "config": self.config.to_dict(),
        }

    def drop_cache(self) -> None:
        """Forget the folded tables (emb_ln0 is V x C floats: 1 GiB at 7.2B)."""
        self._cache.clear()

    def s_emb_folded(self, layer: int, dtype=np.float32) -> np.ndarray:
        """DeepEmbed: s_emb + emb_ln0 @ s_emb_x^T, folded once per layer -> [V, d_semb]."""
        p = f"blocks.{layer}.ffn."
        return self.f32(p + "s_emb.weight", dtype) + self.emb_ln0(dtype) @ self.f32(p + "s_emb_x.weight", dtype).T


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = LN_EPS) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def validate(raw: Mapping[str, np.ndarray], source: str) -> ModelConfig:
    """Check every key and shape against the derived config; name the first problem.

    Expected keys are made one block at a time and the check stops at the first missing one, so a
    file of a few keys that claims a million blocks costs a few keys' work.
    """
    shapes = {k: tuple(np.shape(v)) for k, v in raw.items()}
    cfg = config_from_shapes(shapes, source)
    known: set[str] = set()
    for group in iter_expected(cfg):
        for key, shape in group.items():
            known.add(key)
            if key not in shapes:
                if key in _OPTIONAL:
                    continue
                raise CheckpointError(f"{source} is missing key '{key}' (expected shape {shape}).")
            got = shapes[key]
            same = got == shape or (SQUEEZABLE.search(key) and math.prod(got) == math.prod(shape))
            if not same:
                raise CheckpointError(
                    f"{source}: '{key}' has shape {got}, expected {shape} for this model "
                    f"(n_embd={cfg.n_embd}, vocab={cfg.vocab}, n_layer={cfg.n_layer})."
                )
    unexpected = sorted(set(shapes) - known)
    if unexpected:
        raise CheckpointError(
            f"{source} has an unexpected key {excerpt(unexpected[0])} for an "
            f"{cfg.variant.value} model; is it an RWKV-7 state dict?"
        )
    for key, arr in raw.items():
        if np.dtype(arr.dtype).kind != "f" and str(arr.dtype) != "bfloat16":
            raise CheckpointError(f"{source}: '{key}' has dtype {arr.dtype}; expected bf16, fp16 or fp32 weights.")
    return cfg


def file_digest(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def load_pth(path: Path, *, digest: bool = True, finite: bool = True, verify: bool = True) -> Weights:
    """Read, bound, validate and integrity-check a .pth, cheapest refusal first (issue 14).

    1. ``open_pth``: zip and pickle structure, every bound; maps the file, reads none of its data.
    2. ``validate`` and ``check_sizes``: keys and shapes, then the tensors' bytes against the file's,
       so no later float copy can be larger than a small multiple of the file.
    3. ``verify``: one read of the file checks every CRC-32 and, in the same read, makes the sha256.
    4. ``require_finite``: NaN/inf in any weight, named. Here rather than in ``Weights.f32``: every
       consumer (graph builder, reference, training via ``raw``) is covered before any work starts,
       while the file is still in the page cache; each tensor's pages leave the RSS once checked.
       ``finite=False`` leaves it to a caller that reads every byte anyway (``convert`` checks while copying);
       ``verify=False`` (without ``digest``) leaves step 3 to one that runs it itself (``convert``, in
       parallel with its writes and before its output appears).
    """
    mapped = open_pth(path)
    cfg = validate(mapped.tensors, path.name)
    check_sizes(mapped.tensors, mapped.file_size, path.name)
    sha = hashlib.sha256() if digest else None
    if verify or sha is not None:
        mapped.verify(sha)
    if finite:
        require_finite(mapped.tensors, path.name, release=release_pages)
    return Weights(mapped.tensors, cfg, source=str(path), digest="sha256:" + sha.hexdigest() if sha else "")


def load_weights(path: str | os.PathLike, *, digest: bool = True) -> Weights:
    """Read and validate a .pth, a .safetensors file or an fla-hub folder (no torch needed)."""
    from rwkv_opt.checkpoint.layouts import open_checkpoint

    return open_checkpoint(path, digest=digest)


def from_state_dict(raw: Mapping[str, np.ndarray], source: str = "synthetic", digest: str = "") -> Weights:
    from rwkv_opt.checkpoint.layouts import file_tokenizer

    return Weights(raw, validate(raw, source), source=source, digest=digest, tokenizer=file_tokenizer())
