"""What a benchmark needs to know about an artifact dir, and the weights its reference runs on.

Every artifact records its source in manifest.json: `synthetic:<preset>[-deepembed]:seed<N>` for
the built-in synthetic models (rebuilt here, deterministic) or a checkpoint path (re-read, and its
digest compared with the manifest's so a reference never runs on different weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rwkv_opt.artifact import Manifest, SourceRef, artifact_size, model_path
from rwkv_opt.config import Precision, Provider
from rwkv_opt.errors import RwkvOptError


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
        raise RwkvOptError(
            f"{artifact} is not a directory; pass artifact directories made by `rwkv-opt pipeline` or `rwkv-opt build`."
        )
    model_path(path)
    man = Manifest.read(path)
    ref = man.source_ref
    if not isinstance(ref.config, dict):
        raise RwkvOptError(f"{path / 'manifest.json'} has no source.config; rebuild the artifact with this version.")
    return ArtifactInfo(
        path=path,
        name=path.name,
        target=man.target,
        target_provider=man.provider,
        precision=man.precision,
        quantization=man.quantization,
        logits=man.logits,
        size_bytes=artifact_size(path),
        source=ref.path,
        digest=ref.digest,
        config=dict(ref.config),
    )


def refuse_unrunnable(info: ArtifactInfo, provider: Provider) -> None:
    """Raise one clear sentence when `info` cannot run on `provider` on this machine."""
    from rwkv_opt.runtime import available_providers

    have = available_providers()
    if provider not in have:
        raise RwkvOptError(
            f"execution provider '{provider.value}' is not available in this onnxruntime "
            f"(have: {', '.join(p.value for p in have)}); run on a CUDA machine with onnxruntime-gpu, "
            "or use --providers cpu."
        )
    if provider is Provider.CPU and info.precision == Precision.BF16.value:
        raise RwkvOptError(
            f"{info.name} is a bf16 artifact and ORT's CPU EP has no bf16 kernels; "
            "bench it with --providers cuda on a GPU machine, or bench a cpu-fp32 artifact here."
        )


def source_path(info: ArtifactInfo, checkpoint: str | Path | None = None) -> Path | None:
    """The checkpoint file to load (None for a built-in synthetic source); refuses when it is missing."""
    return _ref(info).locate(checkpoint, beside=info.path.parent)


def check_source(info: ArtifactInfo, checkpoint: str | Path | None = None) -> None:
    """Refuse early (before any measuring) when the reference's weights cannot be had."""
    source_path(info, checkpoint)


def load_weights_for(info: ArtifactInfo, checkpoint: str | Path | None = None):
    """The Weights the artifact was built from (or `checkpoint`, which must have the same digest)."""
    return _ref(info).load(checkpoint, beside=info.path.parent)


def _ref(info: ArtifactInfo) -> SourceRef:
    return SourceRef(info.source, info.digest, info.config)
