"""Single-file writes that appear atomically: the checkpoint writers (.pth, .safetensors) share this."""

from __future__ import annotations

import contextlib
import os
from typing import BinaryIO, Iterator

from rwkv_opt.errors import CheckpointError


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write `path` through its temp sibling `path.tmp`: on success flushed, fsynced and renamed into place;
    on any failure (Ctrl-C included) the temp file is removed; an OSError (full disk, read-only folder)
    becomes one sentence."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"cannot write {path}: {exc.strerror or exc}; check the folder exists, is writable and has free space."
            ) from exc
        raise
