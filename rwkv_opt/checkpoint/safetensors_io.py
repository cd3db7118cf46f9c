"""Read and write .safetensors files without torch or the `safetensors` package.

Format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of UTF-8 JSON
``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the tensor bytes; offsets count from the end of the header.

``read_safetensors`` promises, like ``read_pth``:
  * bounded parsing: N is capped (100 MB, as the reference library) and must lie inside the file;
    the JSON must be an object of well-formed entries; dtypes come from an allow-list of float
    types; each entry's byte span equals prod(shape) * itemsize; the spans tile the data section
    exactly (no gap, no overlap, nothing past the end of the file), as the reference library checks;
  * arrays are zero-copy, read-only views into one ``np.memmap`` of the file (BF16 as
    ``ml_dtypes.bfloat16``);
  * anything else raises ``CheckpointError`` with one sentence naming the file (and the key).

``write_safetensors`` streams one tensor at a time to a temp file that is renamed into place, through
``streamwrite.TensorSink`` (writer thread, copy_file_range of unchanged bytes, early write-back).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from functools import partial

import ml_dtypes
import numpy as np

from rwkv_opt.checkpoint.atomic import atomic_file
from rwkv_opt.checkpoint.streamwrite import TensorSink, release_pages
from rwkv_opt.checkpoint.torchzip_write import _tensor_chunks
from rwkv_opt.errors import CheckpointError

HEADER_CAP = 100_000_000  # bytes of JSON header the reference library accepts
DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16)}
_NAMES = {dt: name for name, dt in DTYPES.items()}
_ALIGN = 8  # the reference writer pads the header with spaces to a multiple of 8


def _refuse(path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} {what}")


def _naturals(v) -> bool:
    """A JSON list of non-negative integers (bools excluded)."""
    return isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)


def _entry(path, key: str, entry, data_size: int) -> tuple[np.dtype, tuple, int, int]:
    """(dtype, shape, begin, end) of one header entry, after the checks in the module docstring."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _refuse(path, f"has a malformed header entry for '{key}' (want dtype, shape, data_offsets).")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise _refuse(path, f"stores '{key}' as {dtype!r}; rwkv-opt reads F32, F16, BF16 or F64 weights.")
    if not _naturals(shape) or not _naturals(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise _refuse(path, f"has a malformed shape or data_offsets for '{key}'.")
    begin, end = offsets
    if end > data_size:
        raise _refuse(
            path,
            f"places '{key}' at bytes {begin}..{end} of a {data_size}-byte data section "
            "(the file is truncated or its header lies); re-download it.",
        )
    if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise _refuse(
            path,
            f"gives '{key}' {end - begin} bytes, but shape {shape} of {dtype} needs "
            f"{math.prod(shape) * DTYPES[dtype].itemsize}.",
        )
    return DTYPES[dtype], tuple(shape), begin, end


def read_header(path) -> tuple[dict, dict, int, int]:
    """-> (entries {key: (dtype, shape, begin, end)}, metadata, data start, file size); checked."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _refuse(path, "is too short to be a .safetensors file (no 8-byte header length).")
        (n,) = struct.unpack("<Q", head)
        if n > HEADER_CAP:
            raise _refuse(
                path,
                f"declares a {n}-byte header, above the {HEADER_CAP}-byte limit; "
                "it is not a .safetensors file or it is damaged.",
            )
        if 8 + n > size:
            raise _refuse(
                path,
                f"declares a {n}-byte header but the file holds only {size} bytes; "
                "it is truncated or not a .safetensors file.",
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # deep nesting: RecursionError
        raise _refuse(path, f"has a header that is not valid JSON ({type(e).__name__}); re-download it.") from None
    if not isinstance(header, dict):
        raise _refuse(path, "has a header that is not a JSON object.")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _refuse(path, "has a __metadata__ that is not a map of strings.")
    entries = {k: _entry(path, k, v, size - 8 - n) for k, v in header.items()}
    _check_tiling(path, entries, size - 8 - n)
    return entries, meta, 8 + n, size


def _check_tiling(path, entries: dict, data_size: int) -> None:
    """The spans, sorted, must follow each other from 0 to the end of the file."""
    at = 0
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"leaves a gap at byte {at}"
            raise _refuse(path, f"has tensor '{key}' that {what}; the header lies about its offsets.")
        at = end
    if at != data_size:
        raise _refuse(
            path, f"has {data_size - at} bytes after its last tensor; the header lies or the file was appended to."
        )


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Map a .safetensors file: {key: read-only array view}, in header order."""
    entries, _, start, size = read_header(path)
    if not entries:
        return {}
    mm = np.memmap(path, np.uint8, mode="r", shape=(size,))
    out = {}
    for key, (dtype, shape, begin, end) in entries.items():
        a = mm[start + begin : start + end].view(dtype).reshape(shape)
        a.flags.writeable = False
        out[key] = a
    return out


def is_safetensors(path) -> bool:
    """Sniff: a plausible header length followed by '{' (the suffix is not trusted)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= HEADER_CAP


def _spec(tensors: Mapping, key: str) -> tuple[np.dtype, tuple]:
    """dtype and shape without making a lazy tensor (synthetic presets have `spec`)."""
    if hasattr(tensors, "spec"):
        dtype, shape = tensors.spec(key)
        return np.dtype(dtype), tuple(shape)
    a = tensors[key]
    return np.dtype(a.dtype), tuple(a.shape)


def _header(path, tensors: Mapping, metadata: dict | None) -> bytes:
    """The padded JSON header for `tensors`, in their order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    at = 0
    for key in tensors:
        dtype, shape = _spec(tensors, key)
        name = _NAMES.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
        if name is None:
            raise CheckpointError(
                f"cannot write {path}: '{key}' has dtype {dtype}; cast it to float32, float16 or bfloat16."
            )
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": name, "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-(8 + len(raw)) % _ALIGN)


def write_safetensors(
    path,
    tensors: Mapping[str, np.ndarray],
    metadata: dict | None = None,
    *,
    check: Callable[[str, np.ndarray], None] | None = None,
    before_commit: Callable[[], None] | None = None,
) -> int:
    """Write `tensors` to `path` one at a time (temp file, fsync, rename); returns bytes written.
    ``check(key, array)`` runs on each tensor just before it is copied (``convert``: the NaN/inf check in
    the same pass over the bytes), ``before_commit()`` once all is written, before the rename (``convert``:
    waits for the source's CRC pass); what either raises aborts the write and removes the temp file."""
    from rwkv_opt.progress import phase, tick

    path = os.fspath(path)
    raw = _header(path, tensors, metadata)
    with atomic_file(path) as fh:
        with TensorSink(fh) as sink, phase("write safetensors", len(tensors), "tensors"):
            sink.write(struct.pack("<Q", len(raw)) + raw)
            for i, key in enumerate(tensors):
                src = np.asarray(tensors[key])
                sink.readahead(src)
                if check is not None:
                    check(key, src)
                for chunk in _tensor_chunks(src):
                    sink.write(chunk)
                sink.then(partial(release_pages, src))  # a mapped source's pages leave the RSS once copied
                tick(i + 1)
            written = sink.size
        if before_commit is not None:
            before_commit()
    return written
