"""Writing an output directory safely: stage it, seal it, swap it in.

Everything is written into a temporary sibling directory which replaces the output at the end, so a
failure never leaves a half-written artifact behind (staging_dir). Only what rwkv-opt wrote is ever
replaced: an existing output directory must hold an rwkv-opt manifest and only files rwkv-opt writes.
A lock file refuses a concurrent run into the same output; staging directories of dead runs are
removed; every file is fsynced and, beside an rwkv-opt manifest, its sha256 recorded (seal).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import re
import shutil
import tempfile
from pathlib import Path

from rwkv_opt.artifact import DATA_FILE, MANIFEST_FILE, MODEL_FILE, TOOL, file_sha256, read_manifest, write_json
from rwkv_opt.errors import RwkvOptError

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
# errors that mean the output cannot be written there (disk full, quota, read-only, no permission)
WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


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
