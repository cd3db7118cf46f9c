"""Weights outside the graph: the pipeline's models are weightless while the passes run.

    with TensorStore(work_dir):                  # one append-only data file in a scratch dir
        model = build_model(weights)             # each initializer is written out as it is made:
                                                 # the ModelProto holds external references only
        model = run_passes(model, ...)           # passes read one tensor (read_array) and write one
        save_model(model, artifact / MODEL_FILE) # (make_tensor) at a time; graph-only passes never
                                                 # touch the weights at all
        # save copies the live tensors, in chunks, into model.onnx.data

Without an active store, make_tensor and read_array are numpy_helper.from_array / to_array: the
same tensors held in the proto, as tests that build tiny models in memory expect. Tensors under
INLINE_BYTES stay in the proto either way (shape constants, norms' scalars), as onnx.save_model's
size_threshold keeps them.

A store tensor is a TensorProto with data_location EXTERNAL whose `location` is relative to the
store's directory, so a weightless model saved into that directory (session_path) is a valid
model that ORT and onnx.checker load straight from the store's file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INLINE_BYTES = 1024  # smaller tensors stay inside the proto (onnx.save_model's size_threshold)
ALIGN = 4096  # every external tensor starts on a page: ORT maps it without a copy
COPY_CHUNK = 64 << 20  # save copies tensors through a buffer this large

_ACTIVE: list["TensorStore"] = []


def _np_dtype(data_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))


def _ext(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _little_contiguous(array) -> np.ndarray:
    """The bytes ONNX stores: little-endian, C order."""
    a = np.asarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a)


def _append_aligned(f, a: np.ndarray) -> int:
    """Write `a`'s bytes at the end of `f`, padded to start on ALIGN -> their offset."""
    f.seek(0, os.SEEK_END)
    offset = -(-f.tell() // ALIGN) * ALIGN
    if offset > f.tell():
        f.write(b"\0" * (offset - f.tell()))
    f.write(memoryview(a.reshape(-1).view(np.uint8)))
    return offset


def _point_to(t: TensorProto, location: str, offset: int, length: int) -> None:
    """Make `t` an external tensor at `location`[offset:offset + length]."""
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def nbytes(t: TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * _np_dtype(t.data_type).itemsize


def is_weight(t: TensorProto) -> bool:
    """A tensor kept outside the proto: in a store already, or INLINE_BYTES or more."""
    return is_external(t) or nbytes(t) >= INLINE_BYTES


class TensorStore:
    """An append-only data file in `directory` for the tensors of the models being made."""

    FILE = "weights.bin"

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / self.FILE
        self._f = open(self.path, "ab+")
        self.bytes_written = 0
        self.ranges: dict[int, int] = {}  # offset -> length of every tensor written and not released
        self.bytes_released = 0

    def __enter__(self) -> "TensorStore":
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        self.close()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def put(self, array: np.ndarray, name: str) -> TensorProto:
        """Write `array` at the end of the file -> its external TensorProto (the array may be freed)."""
        a = _little_contiguous(array)
        offset = _append_aligned(self._f, a)
        self.bytes_written += a.nbytes
        self.ranges[offset] = a.nbytes
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape)
        _point_to(t, self.FILE, offset, a.nbytes)
        return t

    def read(self, t: TensorProto) -> np.ndarray:
        """The tensor's values, read into a private array (no mapping stays behind)."""
        info = _ext(t)
        path = self.dir / info["location"]
        dtype = _np_dtype(t.data_type)
        count = int(np.prod(t.dims, dtype=np.int64))
        self._f.flush()
        with open(path, "rb") as f:
            out = np.fromfile(f, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
        if out.size != count:
            raise ValueError(f"external tensor {t.name}: {path} ends before its {count} values")
        return out.reshape(tuple(t.dims))

    def release(self, offset: int) -> None:
        """Give a tensor's disk blocks back (the file keeps its size: other offsets stay valid)."""
        length = self.ranges.pop(offset, 0)
        if length and _punch_hole(self._f, offset, length):
            self.bytes_released += length

    def release_unreferenced(self, model: onnx.ModelProto) -> int:
        """Release every tensor `model` no longer references (what a pass replaced) -> bytes released.
        Only for a pipeline that drops the models before: earlier models' references die with it."""
        live = {
            int(_ext(t).get("offset", 0))
            for t in model.graph.initializer
            if is_external(t) and _ext(t).get("location") == self.FILE
        }
        before = self.bytes_released
        for offset in [o for o in self.ranges if o not in live]:
            self.release(offset)
        return self.bytes_released - before

    def session_path(self, model: onnx.ModelProto, name: str = "session.onnx") -> Path:
        """Save the weightless `model` beside the store's file: ORT and onnx.checker load it from there."""
        self._f.flush()
        path = self.dir / name
        onnx.save_model(model, str(path))
        return path


def _punch_hole(f, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE | KEEP_SIZE) on Linux file systems that have it; False elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        f.flush()
        return libc.fallocate(f.fileno(), 0x02 | 0x01, offset, length) == 0
    except (OSError, AttributeError):
        return False


def active() -> TensorStore | None:
    return _ACTIVE[-1] if _ACTIVE else None


def make_tensor(array: np.ndarray, name: str) -> TensorProto:
    """numpy_helper.from_array, written to the active store when there is one and it is not small."""
    store = active()
    if store is not None and np.asarray(array).nbytes >= INLINE_BYTES:
        return store.put(array, name)
    return numpy_helper.from_array(np.asarray(array), name)


def read_array(t: TensorProto) -> np.ndarray:
    """numpy_helper.to_array, for store tensors too."""
    if is_external(t):
        store = active()
        if store is None:
            raise ValueError(f"tensor {t.name} lives in a tensor store, but none is active")
        return store.read(t)
    return numpy_helper.to_array(t)


def has_external(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in model.graph.initializer)


def save_streamed(model: onnx.ModelProto, path: Path, external: bool = True, consume: bool = False) -> None:
    """Write `model` to `path` with every initializer of INLINE_BYTES or more in `path`.data,
    copied in COPY_CHUNK pieces from the active store (or from the proto). `model` is not changed.
    `consume` releases each store tensor once copied (the disk holds the model once, not twice)."""
    store = active()
    if store is not None:
        store._f.flush()
    path = Path(path)
    data_name = path.name + ".data"
    out = onnx.ModelProto()
    out.CopyFrom(model)  # weightless: cheap
    moves = [t for t in out.graph.initializer if is_external(t) or (external and is_weight(t))]
    if not external:  # a small model: every tensor back inside the proto, as onnx.save_model writes it
        for t in moves:
            if is_external(t):
                t.CopyFrom(numpy_helper.from_array(read_array(t), t.name))
        moves = []
    if not moves:
        onnx.save_model(out, str(path))
        return
    from rwkv_opt.progress import phase, tick

    with open(path.parent / data_name, "wb") as dst, phase("write", len(moves), "tensors"):
        for done, t in enumerate(moves):
            tick(done)
            if is_external(t):
                if store is None:
                    raise ValueError(f"tensor {t.name} lives in a tensor store, but none is active")
                info = _ext(t)
                length = int(info["length"])
                offset = _append_aligned(dst, np.empty(0, np.uint8))  # the padding; the bytes follow
                with open(store.dir / info["location"], "rb") as src:
                    src.seek(int(info.get("offset", 0)))
                    left = length
                    while left:
                        block = src.read(min(COPY_CHUNK, left))
                        if not block:
                            raise ValueError(f"external tensor {t.name}: its data file ends early")
                        dst.write(block)
                        left -= len(block)
                if consume and info["location"] == store.FILE:
                    store.release(int(info.get("offset", 0)))
            else:
                raw = _little_contiguous(numpy_helper.to_array(t))
                offset, length = _append_aligned(dst, raw), raw.nbytes
                for fd in (
                    "raw_data",
                    "float_data",
                    "int32_data",
                    "int64_data",
                    "double_data",
                    "uint64_data",
                    "string_data",
                ):
                    t.ClearField(fd)
            _point_to(t, data_name, offset, length)
        dst.flush()
        os.fsync(dst.fileno())
    onnx.save_model(out, str(path))


@contextlib.contextmanager
def scratch_store(parent: str | os.PathLike, prefix: str = ".rwkv-opt-work-"):
    """A TensorStore in a fresh directory under `parent`, removed (with everything in it) afterwards."""
    import shutil

    d = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        with TensorStore(d) as store:
            yield store
    finally:
        shutil.rmtree(d, ignore_errors=True)
