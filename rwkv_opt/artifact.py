"""Artifact directories' contracts: model.onnx (+ model.onnx.data), manifest.json (`Manifest`) and the
source an artifact was built from (`SourceRef`).

The manifest records the sha256 and size of every other file it sits beside ("files"), so a changed
file is found before it is trusted (verify_files). How a directory is written safely (staging,
locking, sealing, the atomic swap) is rwkv_opt/outdir.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from rwkv_opt.config import ModelConfig
from rwkv_opt.graph.contract import Meta
from rwkv_opt.onnx_util import numel
from rwkv_opt.errors import RwkvOptError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
TOOL = "rwkv-opt"
MANIFEST_MAX_BYTES = 64 << 20  # a manifest is a few KiB; a larger "manifest" is not read into memory
# Weights go to model.onnx.data above this size: protobuf cannot serialise 2 GiB, and ORT maps
# external data instead of parsing a copy (0.1B fp32: peak RSS 943 MiB vs 1102 MiB, load 1.3 s vs
# 3.1 s; measured with benchmarks/peers.py's worker on this 2-core machine).
EXTERNAL_THRESHOLD = 64 << 20
_HASH_CHUNK = 8 << 20


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            total += onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * max(1, numel(t))
    return total


def save_model(model: onnx.ModelProto, path: Path, external: bool | None = None, consume: bool = False) -> None:
    """Save `model` to `path`; weights go to model.onnx.data beside it when large (or asked)."""
    from rwkv_opt.tensorstore import active, has_external, save_streamed

    if external is None:
        external = initializer_bytes(model) > EXTERNAL_THRESHOLD
    if has_external(model) or (external and active() is not None):
        save_streamed(model, path, external=external, consume=consume)  # tensor by tensor from the store, in chunks
    elif external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


# ---- files in it ------------------------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    """`obj` as JSON at `path`, through a temp file renamed into place (removed when the write fails)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_manifest(artifact: Path) -> dict:
    """The manifest of `artifact` as a dict; a missing, oversized, undecodable or non-object one is refused."""
    p = Path(artifact) / MANIFEST_FILE
    if not p.is_file():
        raise RwkvOptError(
            f"{artifact} has no {MANIFEST_FILE}; pass a directory made by `rwkv-opt pipeline` or `build`."
        )
    if p.stat().st_size > MANIFEST_MAX_BYTES:
        raise RwkvOptError(
            f"{p} is {p.stat().st_size:,} bytes, too large for an rwkv-opt manifest; rebuild the artifact."
        )
    try:
        man = json.loads(p.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise RwkvOptError(f"{p} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    except UnicodeDecodeError as e:
        raise RwkvOptError(f"{p} is not UTF-8 text (byte {e.start}); rebuild the artifact.") from None
    except RecursionError:
        raise RwkvOptError(f"{p} nests too deeply to be an rwkv-opt manifest; rebuild the artifact.") from None
    if not isinstance(man, dict):
        raise RwkvOptError(f"{p} holds a JSON {type(man).__name__}, not an object; rebuild the artifact.")
    return man


def verify_files(artifact: Path) -> int:
    """Check every file the manifest records against its sha256 and size -> how many were checked.
    Raises one sentence naming the first file that is missing or changed."""
    artifact = Path(artifact)
    man = read_manifest(artifact)
    files = man.get("files")
    if not isinstance(files, dict) or not files:
        raise RwkvOptError(
            f"{artifact / MANIFEST_FILE} records no file digests (written by an older rwkv-opt); "
            "rebuild the artifact to verify it."
        )
    for rel, rec in files.items():
        p = artifact / rel
        if not isinstance(rec, dict) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise RwkvOptError(
                f"{artifact / MANIFEST_FILE} has a malformed entry for '{rel}' in \"files\"; rebuild the artifact."
            )
        if not p.is_file():
            raise RwkvOptError(f"{p} is missing, though {MANIFEST_FILE} lists it; rebuild or copy the whole artifact.")
        if p.stat().st_size != rec.get("bytes") or file_sha256(p) != rec.get("sha256"):
            raise RwkvOptError(
                f"{p} does not match the sha256 in {MANIFEST_FILE}: it changed after rwkv-opt wrote "
                "it; rebuild the artifact."
            )
    return len(files)


def verify_recorded(artifact: Path) -> int:
    """verify_files when the manifest records digests -> files checked (0 for an artifact without any)."""
    if not (Path(artifact) / MANIFEST_FILE).is_file() or "files" not in read_manifest(artifact):
        return 0
    return verify_files(artifact)


def file_sha256(path: Path, sync: bool = False) -> str:
    """The sha256 of `path`, read in chunks; `sync` also fsyncs it (the seal reads every file once for both)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_CHUNK):
            h.update(block)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def load_proto(path: Path) -> onnx.ModelProto:
    """The graph of model file `path` without its external weights; a file that is not an ONNX model is refused."""
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise RwkvOptError(
            f"{path} is not a readable ONNX model ({str(e).splitlines()[0][:120] or 'truncated'}); "
            "rebuild the artifact."
        ) from None


def model_config(path: Path, meta: dict[str, str]) -> ModelConfig:
    """The rwkv_opt.config metadata entry of model `path` (its metadata_props `meta`) as a ModelConfig;
    a missing or malformed one is refused in one sentence (contract.Meta.config)."""
    cfg = Meta(meta).config(where=str(path))
    if cfg is None:
        raise RwkvOptError(f"{path} has no rwkv-opt metadata; build it with `rwkv-opt build` or `pipeline`.")
    return cfg


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
        elif self.path:  # Path("") would be the current directory
            p = Path(self.path)
            candidates = [p] + ([beside / p] if beside is not None and not p.is_absolute() else [])
        else:
            candidates = []
        for path in candidates:
            if path.exists():  # a file, or a Hugging Face folder
                return path
        raise RwkvOptError(
            f"the artifact was built from '{checkpoint or self.path}', which is not on this machine; "
            "pass --checkpoint with the same checkpoint."
        )

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
            raise RwkvOptError(
                f"{path} is not the checkpoint the artifact was built from (digest {w.digest[:19]}... "
                f"vs {self.digest[:19]}... in its manifest); pass the original file."
            )
        if self.config is not None and w.config.to_dict() != self.config:
            raise RwkvOptError(
                f"{path} has a different model shape than the artifact's source; pass the checkpoint it was built from."
            )
        return w


# ---- the manifest -------------------------------------------------------------------------------
def versions() -> dict:
    """The versions that made an artifact (recorded in its manifest and in bench reports)."""
    import platform

    import numpy as np
    import onnxruntime
    import onnxsim

    from rwkv_opt import __version__

    return {
        "rwkv_opt": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxsim": getattr(onnxsim, "__version__", "?"),
    }


_TYPED = {
    "tool": str,
    "target": str,
    "provider": str,
    "precision": str,
    "quantization": str,
    "logits": str,
    "source": dict,
    "passes": list,
    "heads": list,
    "versions": dict,
}


@dataclass
class Manifest:
    """manifest.json of an artifact directory, written (`write`) and read (`read`) here only.

    The typed fields are what other programs rely on; `extra` keeps the rest in order (build and phase
    timings, sizes, quantization_algorithm, created), `verification` the accuracy check's record and
    `files` the sha256 and size of every other file (added by `seal`). docs/architecture.md, Contract 4."""

    target: str
    provider: str
    precision: str
    quantization: str
    logits: str
    source: dict
    passes: list = field(default_factory=list)
    heads: list = field(default_factory=list)
    versions: dict = field(default_factory=versions)
    verification: dict | None = None
    files: dict | None = None
    extra: dict = field(default_factory=dict)
    tool: str = TOOL

    @property
    def source_ref(self) -> SourceRef:
        return SourceRef.from_manifest({"source": self.source})

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _TYPED}
        d.update(self.extra)
        for k in ("verification", "files"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest.json") -> "Manifest":
        """A manifest from its JSON object; a typed field of the wrong kind is refused in one sentence.
        Fields older manifests lack read as their defaults ("?" for the identity strings)."""
        if d.get("tool", TOOL) != TOOL:
            raise RwkvOptError(
                f"{where} was not written by rwkv-opt (tool {str(d.get('tool'))[:40]!r}); pass an rwkv-opt artifact."
            )
        for k, kind in _TYPED.items():
            if k in d and not isinstance(d[k], kind):
                raise RwkvOptError(
                    f"{where}: '{k}' should be a JSON {kind.__name__}, not {type(d[k]).__name__}; rebuild the artifact."
                )
        for k in ("verification", "files"):
            if d.get(k) is not None and not isinstance(d[k], dict):
                raise RwkvOptError(f"{where}: '{k}' should be a JSON object; rebuild the artifact.")
        known = set(_TYPED) | {"verification", "files"}
        return cls(
            **{k: d.get(k, "?") for k in ("target", "provider", "precision", "quantization", "logits")},
            source=d.get("source", {}),
            passes=d.get("passes", []),
            heads=d.get("heads", []),
            versions=d.get("versions", {}),
            verification=d.get("verification"),
            files=d.get("files"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def read(cls, artifact: Path) -> "Manifest":
        return cls.from_dict(read_manifest(artifact), str(Path(artifact) / MANIFEST_FILE))

    def write(self, directory: Path) -> None:
        write_json(Path(directory) / MANIFEST_FILE, self.to_dict())
