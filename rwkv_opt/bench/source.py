"""What a benchmark needs to know about an artifact dir, and the weights its reference runs on.

Every artifact records its source in manifest.json: `synthetic:<preset>[-deepembed]:seed<N>` for
the built-in synthetic models (rebuilt here, deterministic) or a checkpoint path (re-read, and its
digest compared with the manifest's so a reference never runs on different weights).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rwkv_opt.artifact import artifact_size, model_path, read_manifest
from rwkv_opt.config import Precision, Provider
from rwkv_opt.errors import RwkvOptError

_SYNTH = re.compile(r"^synthetic:(?P<preset>[\w.]+?)(?P<de>-deepembed)?:seed(?P<seed>\d+)$")


@dataclass(frozen=True)
class ArtifactInfo:
    """The identity columns of a benchmark row, read from the artifact's manifest."""

    path: Path
    name: str
    target: str
    target_provider: str
    precision: str
    quantization: str
    logits: str
    size_bytes: int
    source: str
    digest: str
    config: dict


def artifact_info(artifact: str | Path) -> ArtifactInfo:
    path = Path(artifact).absolute()
    if not path.is_dir():
        raise RwkvOptError(f"{artifact} is not a directory; pass artifact directories made by `rwkv-opt pipeline` "
                           "or `rwkv-opt build`.")
    model_path(path)
    man = read_manifest(path)
    src = man.get("source", {})
    if "config" not in src:
        raise RwkvOptError(f"{path / 'manifest.json'} has no source.config; rebuild the artifact with this version.")
    return ArtifactInfo(path=path, name=path.name, target=str(man.get("target", path.name)),
                        target_provider=str(man.get("provider", "cpu")), precision=str(man.get("precision", "?")),
                        quantization=str(man.get("quantization", "none")), logits=str(man.get("logits", "?")),
                        size_bytes=artifact_size(path), source=str(src.get("path", "")),
                        digest=str(src.get("digest", "")), config=dict(src["config"]))


def refuse_unrunnable(info: ArtifactInfo, provider: Provider) -> None:
    """Raise one clear sentence when `info` cannot run on `provider` on this machine."""
    from rwkv_opt.runtime import available_providers

    have = available_providers()
    if provider not in have:
        raise RwkvOptError(f"execution provider '{provider.value}' is not available in this onnxruntime "
                           f"(have: {', '.join(p.value for p in have)}); run on a CUDA machine with onnxruntime-gpu, "
                           "or use --providers cpu.")
    if provider is Provider.CPU and info.precision == Precision.BF16.value:
        raise RwkvOptError(f"{info.name} is a bf16 artifact and ORT's CPU EP has no bf16 kernels; "
                           "bench it with --providers cuda on a GPU machine, or bench a cpu-fp32 artifact here.")


def source_path(info: ArtifactInfo, checkpoint: str | Path | None = None) -> Path | None:
    """The checkpoint file to load (None for a built-in synthetic source); refuses when it is missing.

    A relative source path in the manifest is relative to where `pipeline` ran, which is unknown:
    it is looked up from the current directory, then beside the artifact directory."""
    if checkpoint is None and _SYNTH.match(info.source):
        return None
    if checkpoint is not None:
        candidates = [Path(checkpoint)]
    else:
        candidates = [Path(info.source)] + ([] if Path(info.source).is_absolute() else [info.path.parent / info.source])
    for path in candidates:
        if path.exists():  # a file, or a Hugging Face folder
            return path
    raise RwkvOptError(f"{info.name} was built from {checkpoint or info.source}, which is not on this machine; "
                       "pass --checkpoint with the same .pth file (or bench without accuracy).")


def check_source(info: ArtifactInfo, checkpoint: str | Path | None = None) -> None:
    """Refuse early (before any measuring) when the reference's weights cannot be had."""
    source_path(info, checkpoint)


def load_weights_for(info: ArtifactInfo, checkpoint: str | Path | None = None):
    """The Weights the artifact was built from (or `checkpoint`, which must have the same digest)."""
    from rwkv_opt.checkpoint import load_source
    from rwkv_opt.checkpoint.weights import load_weights

    path = source_path(info, checkpoint)
    if path is None:
        m = _SYNTH.match(info.source)
        return load_source(None, m["preset"], bool(m["de"]), int(m["seed"]))
    w = load_weights(path, digest=bool(info.digest) and not info.digest.startswith("synthetic"))
    if w.digest and info.digest and w.digest != info.digest:
        raise RwkvOptError(f"{path} is not the checkpoint {info.name} was built from (digest {w.digest[:12]}... "
                           f"vs {info.digest[:12]}... in its manifest); pass the original file.")
    if w.config.to_dict() != info.config:
        raise RwkvOptError(f"{path} has a different model shape than {info.name}; pass the checkpoint it was built from.")
    return w
