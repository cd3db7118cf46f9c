"""Artifact directories: model.onnx (+ model.onnx.data) and manifest.json, written atomically.

Everything is written into a temporary sibling directory which is renamed into place at the
end, so a failure never leaves a half-written artifact behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from rwkv_opt.errors import RwkvOptError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
# Weights go to model.onnx.data above this size: protobuf cannot serialise 2 GiB, and ORT maps
# external data instead of parsing a copy (0.1B fp32: peak RSS 943 MiB vs 1102 MiB, load 1.3 s vs
# 3.1 s; measured with benchmarks/peers.py's worker on this 2-core machine).
EXTERNAL_THRESHOLD = 64 << 20


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            total += onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * max(1, _numel(t))
    return total


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def save_model(model: onnx.ModelProto, path: Path, external: bool | None = None, consume: bool = False) -> None:
    """Save `model` to `path`; weights go to model.onnx.data beside it when large (or asked)."""
    from rwkv_opt.tensorstore import active, has_external, save_streamed

    if external is None:
        external = initializer_bytes(model) > EXTERNAL_THRESHOLD
    if has_external(model) or (external and active() is not None):
        save_streamed(model, path, external=external, consume=consume)  # tensor by tensor from the store, in chunks
    elif external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


@contextlib.contextmanager
def staging_dir(out: Path):
    """Yield a temp dir next to `out`; on success it replaces `out`, on failure it is removed."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise RwkvOptError(f"output path {out} exists and is not a directory; choose a directory path.")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).exists():
        raise RwkvOptError(f"output directory {out} is not empty and is not an rwkv-opt artifact; "
                           "choose a new or empty directory.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_manifest(artifact: Path) -> dict:
    p = Path(artifact) / MANIFEST_FILE
    if not p.is_file():
        raise RwkvOptError(f"{artifact} has no {MANIFEST_FILE}; pass a directory made by `rwkv-opt pipeline` or `build`.")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise RwkvOptError(f"{p} is not valid JSON ({e.msg} at line {e.lineno}).") from None


def model_path(artifact: Path) -> Path:
    artifact = Path(artifact)
    p = artifact / MODEL_FILE if artifact.is_dir() else artifact
    if not p.is_file():
        raise RwkvOptError(f"{artifact} holds no {MODEL_FILE}; pass an artifact directory or a .onnx file.")
    return p


def artifact_size(artifact: Path) -> int:
    artifact = Path(artifact)
    return sum(f.stat().st_size for f in artifact.glob("model.onnx*") if f.is_file())


# ---- the source an artifact was built from ------------------------------------------------------
_SYNTH = re.compile(r"^synthetic:(?P<preset>[\w.]+?)(?P<deep>-deepembed)?:seed(?P<seed>\d+)$")


@dataclass(frozen=True)
class SourceRef:
    """manifest.json's "source": the checkpoint path (or `synthetic:<preset>[-deepembed]:seed<N>` for a
    built-in synthetic model), its digest and its ModelConfig as a dict. Formats, parses and loads the
    weights it names, refusing weights that are not the ones the artifact was built from."""

    path: str
    digest: str = ""
    config: dict | None = None

    @staticmethod
    def synthetic_name(preset: str, deepembed: bool, seed: int) -> str:
        return f"synthetic:{preset}{'-deepembed' if deepembed else ''}:seed{seed}"

    @classmethod
    def from_manifest(cls, manifest: dict) -> "SourceRef":
        src = manifest.get("source") or {}
        return cls(str(src.get("path", "")), str(src.get("digest", "")), src.get("config"))

    @property
    def is_synthetic(self) -> bool:
        return _SYNTH.match(self.path) is not None

    def locate(self, checkpoint: str | os.PathLike | None = None, beside: Path | None = None) -> Path | None:
        """The checkpoint file to read (None for a synthetic source), or one sentence when it is missing.
        A relative path in the manifest is relative to where the artifact was built, which is unknown:
        it is looked up from the current directory, then beside the artifact directory (`beside`)."""
        if checkpoint is None and self.is_synthetic:
            return None
        if checkpoint is not None:
            candidates = [Path(checkpoint)]
        else:
            p = Path(self.path)
            candidates = [p] + ([beside / p] if beside is not None and self.path and not p.is_absolute() else [])
        for path in candidates:
            if str(path) and path.exists():  # a file, or a Hugging Face folder
                return path
        raise RwkvOptError(f"the artifact was built from '{checkpoint or self.path}', which is not on this machine; "
                           "pass --checkpoint with the same checkpoint.")

    def load(self, checkpoint: str | os.PathLike | None = None, beside: Path | None = None, same_weights: bool = True):
        """The Weights this source names, or `checkpoint`: of the same shape, and with the same digest
        unless `same_weights` is False (training may start from other weights of the same model)."""
        from rwkv_opt.checkpoint import load_source
        from rwkv_opt.checkpoint.weights import load_weights

        path = self.locate(checkpoint, beside)
        if path is None:
            m = _SYNTH.match(self.path)
            return load_source(None, m["preset"], bool(m["deep"]), int(m["seed"]))
        same_weights = same_weights or checkpoint is None
        w = load_weights(path, digest=same_weights and bool(self.digest) and not self.digest.startswith("synthetic"))
        if same_weights and w.digest and self.digest and w.digest != self.digest:
            raise RwkvOptError(f"{path} is not the checkpoint the artifact was built from (digest {w.digest[:19]}... "
                               f"vs {self.digest[:19]}... in its manifest); pass the original file.")
        if self.config is not None and w.config.to_dict() != self.config:
            raise RwkvOptError(f"{path} has a different model shape than the artifact's source; "
                               "pass the checkpoint it was built from.")
        return w
