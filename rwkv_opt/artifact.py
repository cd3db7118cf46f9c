"""Artifact directories: model.onnx (+ model.onnx.data) and manifest.json, written atomically.

Everything is written into a temporary sibling directory which replaces the output at the end, so a
failure never leaves a half-written artifact behind (staging_dir). Only what rwkv-opt wrote is ever
replaced: an existing output directory must hold an rwkv-opt manifest and only files rwkv-opt writes.
The manifest records the sha256 and size of every other file it sits beside ("files"), so a changed
file is found before it is trusted (verify_files).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
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
# Files rwkv-opt's commands write into an output directory (pipeline/build: the model; train: model.pth and,
# with --save-graphs, training/run.py's graphs), for manifests written before they recorded "files".
OWN_FILES = frozenset(
    {
        MODEL_FILE,
        DATA_FILE,
        MANIFEST_FILE,
        "model.pth",
        "train_step.onnx",
        "eval.onnx",
        "optimizer_state.npz",
        "train_step.json",
    }
)
MANIFEST_MAX_BYTES = 64 << 20  # a manifest is a few KiB; a larger "manifest" is not read into memory
# Weights go to model.onnx.data above this size: protobuf cannot serialise 2 GiB, and ORT maps
# external data instead of parsing a copy (0.1B fp32: peak RSS 943 MiB vs 1102 MiB, load 1.3 s vs
# 3.1 s; measured with benchmarks/peers.py's worker on this 2-core machine).
EXTERNAL_THRESHOLD = 64 << 20
_HASH_CHUNK = 8 << 20
# errors that mean the output cannot be written there (disk full, quota, read-only, no permission)
WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


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


# ---- the output directory ---------------------------------------------------------------------------------


@contextlib.contextmanager
def staging_dir(out: Path):
    """Yield a temp dir next to `out`; on success it replaces `out`, on failure it is removed.

    Refused before anything is written: `out` is (or holds) the current directory, or is a directory
    holding anything rwkv-opt did not write. A lock file beside `out` (.NAME.lock) makes a second run
    into the same `out` refuse; staging dirs that dead runs left there are removed. On success every
    file is hashed into the manifest (when it is rwkv-opt's), given the umask's modes and fsynced, and
    the directory swaps places with `out` atomically."""
    out = _output_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _locked(out):
            refuse_foreign(out)
            _remove_stale(out)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
            try:
                os.chmod(tmp, 0o777 & ~_umask())
                yield tmp
                seal(tmp)
                _commit(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as e:
        if not _output_error(e, out):
            raise
        raise write_refusal(e, out) from None


def write_refusal(e: OSError, path: Path) -> RwkvOptError:
    """The one sentence for an output that cannot be written (disk full, quota, read-only, permission)."""
    return RwkvOptError(
        f"cannot write {path}: {WRITE_ERRNOS[e.errno]} ({e.filename or Path(path).parent}); free "
        "some space or choose a writable path, nothing was written."
    )


def _output_error(e: OSError, out: Path) -> bool:
    """Whether `e` says the output cannot be written: disk full or read-only anywhere, or no permission
    for the staging dir, the lock file or a parent being made (not for an input file that cannot be read)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    if e.errno not in WRITE_ERRNOS or not e.filename:
        return False
    fn = Path(os.fsdecode(e.filename)).absolute()
    mine = f".{out.name}."
    return fn == out or fn in out.parents or any(q.name.startswith(mine) for q in [fn, *fn.parents])


def _output_path(out: Path) -> Path:
    """`out` made absolute with links resolved; the current directory and those above it are refused."""
    out = Path(out).resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise RwkvOptError(
            f"output directory {out} is the current directory or holds it; pass a new directory "
            "such as -o artifacts/NAME, nothing was changed."
        )
    return out


def refuse_foreign(out: Path) -> None:
    """Raise unless `out` is absent, empty, or an rwkv-opt artifact holding only files rwkv-opt writes."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise RwkvOptError(f"output path {out} exists and is not a directory; choose a directory path.")
    if not any(out.iterdir()):
        return
    owned = _owned_files(out)
    if owned is None:
        raise RwkvOptError(
            f"output directory {out} is not empty and is not an rwkv-opt artifact (no rwkv-opt "
            f"{MANIFEST_FILE}); choose a new or empty directory, nothing was changed."
        )
    for root, dirs, files in os.walk(out):
        for name in sorted(dirs) + sorted(files):
            p = Path(root, name)
            rel = p.relative_to(out).as_posix()
            if p.is_symlink() or not p.is_file() or rel not in owned:
                raise RwkvOptError(
                    f"output directory {out} holds {rel}, which rwkv-opt did not write; move it "
                    "away or choose another -o, nothing was changed."
                )


def _owned_files(out: Path) -> set[str] | None:
    """The file names an rwkv-opt manifest in `out` accounts for, or None when it is not rwkv-opt's."""
    try:
        man = read_manifest(out)
    except RwkvOptError:
        return None
    if man.get("tool") != TOOL:
        return None
    files = man.get("files")
    return set(OWN_FILES) | (set(files) if isinstance(files, dict) else set())


@contextlib.contextmanager
def _locked(out: Path):
    """Hold an exclusive flock on .NAME.lock beside `out` (holding our pid); refuse when another run holds it.
    The lock file is removed on release; a run that opened a file since unlinked tries again."""
    path = out.with_name(f".{out.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise RwkvOptError(
                f"another rwkv-opt run (pid {holder}) is writing {out}; wait for it to finish or choose another -o."
            ) from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-.*)?$")


def _remove_stale(out: Path) -> list[Path]:
    """Remove the .NAME.tmp-PID-* / .NAME.old-PID* dirs of runs that are dead (we hold the lock, so no
    live run is writing `out`; a dir with our own pid was left by an earlier process given the same pid)."""
    removed = []
    for p in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        m = _STAGING.match(p.name)
        if m and m["name"] == out.name and p.is_dir() and not p.is_symlink() and not _alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def seal(directory: Path) -> None:
    """Give every file in `directory` the umask's mode and fsync it; when its manifest is rwkv-opt's, record
    each other file's sha256 and size there ("files")."""
    directory = Path(directory)
    files, man_path = {}, directory / MANIFEST_FILE
    man = read_manifest(directory) if man_path.is_file() else None
    record = man is not None and man.get("tool") == TOOL  # only an rwkv-opt manifest lists its files' digests
    mask = _umask()
    for p in sorted(q for q in directory.rglob("*") if q.is_file() and q != man_path):
        os.chmod(p, 0o666 & ~mask)
        if record:
            files[p.relative_to(directory).as_posix()] = {
                "sha256": file_sha256(p, sync=True),
                "bytes": p.stat().st_size,
            }
        else:  # e.g. a Hugging Face folder from `convert`: durable, not hashed (a 1.5B folder: ~10 s saved)
            _fsync_file(p)
    for d in [directory, *(q for q in directory.rglob("*") if q.is_dir())]:
        os.chmod(d, 0o777 & ~mask)
    if man is not None:
        if record:
            write_json(man_path, {**man, "files": files})
        os.chmod(man_path, 0o666 & ~mask)
        _fsync_file(man_path)
    _fsync_dir(directory)


def _fsync_file(p: Path) -> None:
    with open(p, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, out: Path) -> None:
    """Put `tmp` in `out`'s place: one atomic exchange when `out` exists (the old content is then at `tmp`
    and removed), else a rename; the parent directory is fsynced after."""
    if not out.exists():
        tmp.rename(out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # no RENAME_EXCHANGE on this file system: two renames, the old dir restored if the second fails
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(RENAME_EXCHANGE): swap two paths atomically (Linux >= 3.15); False where unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


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
