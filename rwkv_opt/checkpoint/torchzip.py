"""Read PyTorch ``.pth`` checkpoints (the torch zip format) without importing torch.

Spec: /work/shared/docs/torch-zip-format.md (sections 5, 6 and 8). A ``torch.save`` file is a
zip archive ``PREFIX/{data.pkl, version, data/<key>, ...}``; ``data.pkl`` is a pickle in which
each tensor is ``_rebuild_tensor_v2(persistent_id('storage', <Kind>Storage, key, loc, numel),
offset, size, stride, requires_grad, hooks)`` and storage ``key`` is the raw little-endian
member ``PREFIX/data/<key>``.

``read_pth`` promises:
  * no code from the file runs: opcodes are scanned first, and the unpickler resolves only an
    allow-list of names into inert markers and checking rebuild functions (section 5.2);
  * every storage member exists, is stored (not compressed), lies inside the file and has exactly
    numel * itemsize bytes; every view lies inside its storage before it is built;
  * arrays are zero-copy, read-only views into one ``np.memmap`` of the file (bf16 as
    ``ml_dtypes.bfloat16``); tensors that share a storage share memory, as in torch.
    The one copy: a file marked ``byteorder = big`` is byte-swapped per tensor.
  * deflated members are refused, not read through a copying fallback: torch's own
    ``mmap=True`` loader (used by ``rwkv``) silently maps such members as garbage, so a
    re-zipped file is a file to fix, not to accept.
  * everything else it cannot read (legacy non-zip stream, tar, empty, truncated, hostile
    pickle, lying sizes) raises ``CheckpointError`` with one sentence naming the file.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import struct
import zipfile
import zlib

import ml_dtypes
import numpy as np

from rwkv_opt.errors import CheckpointError
from rwkv_opt.checkpoint.torchzip_write import write_pth

__all__ = ["read_pth", "release_pages", "write_pth"]

_RESAVE = "re-save it with torch.save(state_dict, path) (zip format, the default since torch 1.6)"
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

# The §6.2 protocol-2 subset torch writes, plus the protocol-4 framing opcodes (section 5.3 #5).
_ALLOWED_OPCODES = frozenset(
    "PROTO STOP MARK EMPTY_DICT EMPTY_LIST EMPTY_TUPLE EMPTY_SET TUPLE TUPLE1 TUPLE2 TUPLE3 "
    "BINUNICODE SHORT_BINSTRING BININT BININT1 BININT2 LONG1 BINFLOAT NONE NEWTRUE NEWFALSE "
    "GLOBAL REDUCE BUILD NEWOBJ APPEND APPENDS SETITEM SETITEMS BINPERSID BINGET LONG_BINGET "
    "BINPUT LONG_BINPUT FRAME SHORT_BINUNICODE MEMOIZE STACK_GLOBAL".split()
)

_TYPED_STORAGES = {  # torch.<Kind>Storage -> numpy dtype; numel counts elements
    "FloatStorage": np.dtype("<f4"), "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16), "DoubleStorage": np.dtype("<f8"),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"), "ComplexDoubleStorage": np.dtype("<c16"),
}
_V3_DTYPES = {  # dtype globals of _rebuild_tensor_v3; its UntypedStorage numel counts bytes
    "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4"), "uint64": np.dtype("<u8"),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


_ONLY_TENSORS = f"only name -> tensor dicts written by torch.save are read, so {_RESAVE}"
_DAMAGED = f"re-download it or {_RESAVE}"


class _Refused(Exception):
    """What is wrong and what would work; read_pth makes it a CheckpointError naming the file."""

    def __init__(self, problem: str, fix: str = _ONLY_TENSORS):
        super().__init__(f"{problem}; {fix}")


class _Inert:
    """Base of every object the unpickler can hand out: BUILD (__setstate__) on it is refused."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Refused(f"sets state on {self!r}, which a weights file never does")


class _Marker(_Inert):
    """Stands for a storage class or dtype global; it is not callable and carries no code."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype | None):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return self.name


class _Rebuild(_Inert):
    """An allow-listed torch rebuild function, replaced by one of our checking functions."""

    __slots__ = ("name", "fn")

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self):
        return self.name


class _OrderedDict(collections.OrderedDict):
    """collections.OrderedDict whose BUILD state (a state_dict's ``_metadata``) is dropped."""

    def __setstate__(self, state):
        pass


class _StorageRef(_Inert):
    __slots__ = ("key", "dtype", "numel")  # numel in elements of dtype (None: bytes, untyped)

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel

    def __repr__(self):
        return f"storage {self.key!r}"


class _TensorRef(_Inert):
    """Placeholder returned by the rebuild functions; arrays are made after unpickling."""

    __slots__ = ("storage", "dtype", "offset", "shape", "strides")

    def __init__(self, storage, dtype, offset, shape, strides):
        self.storage, self.dtype = storage, dtype
        self.offset, self.shape, self.strides = offset, shape, strides

    def __repr__(self):
        return "a tensor"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor(storage, offset, size, stride, requires_grad, hooks, dtype):
    """The checks shared by the v2 and v3 rebuild forms (section 5.3 #3)."""
    if not isinstance(storage, _StorageRef):
        raise _Refused(f"rebuilds a tensor from {storage!r} instead of a storage")
    ok = (
        _is_int(offset) and isinstance(size, tuple) and isinstance(stride, tuple)
        and len(size) == len(stride) and all(_is_int(v) for v in size + stride)
        and isinstance(requires_grad, bool) and isinstance(hooks, _OrderedDict) and not hooks
    )
    if not ok:
        raise _Refused("has a tensor whose offset, size, stride or hooks are malformed")
    if offset < 0 or min(size + stride, default=0) < 0:
        raise _Refused("has a tensor with a negative offset, size or stride")
    if dtype.itemsize == 0:
        raise _Refused("has a tensor with a zero-size dtype")
    numel = storage.numel if storage.dtype is not None else storage.numel // dtype.itemsize
    if 0 in size:
        inside = offset <= numel
    else:
        inside = offset + sum((n - 1) * s for n, s in zip(size, stride)) < numel
    if not inside:
        raise _Refused(
            f"has a tensor (offset {offset}, size {size}, stride {stride}) that reaches past "
            f"the end of its {numel}-element storage {storage.key!r}"
        )
    return _TensorRef(storage, dtype, offset, size, stride)


def _rebuild_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None, *extra):
    if extra or metadata:
        raise _Refused("has a conjugate/negative-view tensor or extra rebuild arguments")
    if not isinstance(storage, _StorageRef) or storage.dtype is None:
        raise _Refused("uses _rebuild_tensor_v2 without a typed storage")
    return _tensor(storage, offset, size, stride, requires_grad, hooks, storage.dtype)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if metadata or not isinstance(dtype, _Marker) or dtype.dtype is None:
        raise _Refused("has a _rebuild_tensor_v3 call without a known dtype")
    if not isinstance(storage, _StorageRef) or storage.dtype is not None:
        raise _Refused("uses _rebuild_tensor_v3 without an UntypedStorage")
    if storage.numel % dtype.dtype.itemsize:
        raise _Refused(f"has storage {storage.key!r} whose byte count is not a whole number "
                       f"of {dtype.name} values")
    return _tensor(storage, offset, size, stride, requires_grad, hooks, dtype.dtype)


def _rebuild_parameter(data, requires_grad, hooks):
    if not (isinstance(data, _TensorRef) and isinstance(requires_grad, bool)
            and isinstance(hooks, _OrderedDict) and not hooks):
        raise _Refused("has a malformed nn.Parameter")
    return data


_UNTYPED = _Marker("torch.storage.UntypedStorage", None)
_ALLOWED_GLOBALS = {
    "collections.OrderedDict": _OrderedDict,
    "torch._utils._rebuild_tensor_v2": _Rebuild("_rebuild_tensor_v2", _rebuild_v2),
    "torch._utils._rebuild_tensor_v3": _Rebuild("_rebuild_tensor_v3", _rebuild_v3),
    "torch._utils._rebuild_parameter": _Rebuild("_rebuild_parameter", _rebuild_parameter),
    "torch.storage.UntypedStorage": _UNTYPED,
    **{f"torch.{k}": _Marker(f"torch.{k}", dt) for k, dt in _TYPED_STORAGES.items()},
    **{f"torch.{k}": _Marker(f"torch.{k}", dt) for k, dt in _V3_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only _ALLOWED_GLOBALS and checks every persistent id (section 5.3 #1)."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module, name):
        obj = _ALLOWED_GLOBALS.get(f"{module}.{name}")
        if obj is None:
            raise _Refused(f"wants to load {module}.{name}, which a weights file never needs",
                           "the file may be malicious, so do not open it with "
                           "torch.load(weights_only=False) either")
        return obj

    def persistent_load(self, pid):
        ok = (
            isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _Marker) and pid[1].name.endswith("Storage")
            and isinstance(pid[2], str)
            and isinstance(pid[3], str) and _is_int(pid[4]) and pid[4] >= 0
        )
        if not ok:
            raise _Refused(f"has a malformed storage reference {pid!r}")
        ref = _StorageRef(pid[2], pid[1].dtype, pid[4])
        seen = self.storages.setdefault(ref.key, ref)
        if (seen.dtype, seen.numel) != (ref.dtype, ref.numel):
            raise _Refused(f"declares storage {ref.key!r} twice with different types or sizes")
        return seen


def _unpickle(data: bytes) -> dict:
    try:
        for op, _, _ in pickletools.genops(data):
            if op.name not in _ALLOWED_OPCODES:
                raise _Refused(f"uses pickle opcode {op.name}, which a weights file never needs")
    except ValueError as exc:
        raise _Refused(f"has a damaged data.pkl ({exc})", _DAMAGED) from exc
    try:
        obj = _Unpickler(data).load()
    except _Refused:
        raise
    # A hostile or damaged pickle can make the unpickler raise nearly any exception type.
    except Exception as exc:
        raise _Refused(f"has a data.pkl that cannot be unpickled ({exc})") from exc
    if not isinstance(obj, dict):
        raise _Refused(f"holds {type(obj).__name__}, not a dict of tensors")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise _Refused(f"has a key {key!r} that is not a string")
        if not isinstance(value, _TensorRef):
            raise _Refused(f"maps {key!r} to {type(value).__name__}, not a tensor "
                           "(only flat name -> tensor dicts are read)")
    return obj


class _Archive:
    """The zip directory of one checkpoint: prefix, records, and storage locations."""

    def __init__(self, zf: zipfile.ZipFile, file_size: int):
        self.zf, self.file_size = zf, file_size
        infos = zf.infolist()
        if not infos or "/" not in infos[0].filename:
            raise _Refused("is a zip file but not a PyTorch checkpoint (no archive folder)")
        self.prefix = infos[0].filename.split("/", 1)[0] + "/"
        stray = [i.filename for i in infos if not i.filename.startswith(self.prefix)]
        if stray:
            raise _Refused(f"has member {stray[0]!r} outside its archive folder {self.prefix!r}")
        self.members = {i.filename[len(self.prefix):]: i for i in infos}
        if "data.pkl" not in self.members:
            raise _Refused(f"has no {self.prefix}data.pkl member")
        version = self.record(".data/version") or self.record("version")
        if version is None or not version.strip().isdigit() or not 1 <= int(version) <= 10:
            raise _Refused(f"has a missing or unsupported format version {version!r} (1..10)")
        self.byteorder = (self.record("byteorder") or b"little").decode("ascii").strip()
        if self.byteorder not in ("little", "big"):
            raise _Refused(f"has an unknown byteorder record {self.byteorder!r}")

    def record(self, member: str) -> bytes | None:
        """A small member, read through zipfile (which checks its CRC-32)."""
        info = self.members.get(member)
        return None if info is None else self.zf.read(info)

    def storage_start(self, mm: np.memmap, key: str, nbytes: int, verify_crc: bool):
        """File offset of member data/<key>'s bytes, after the section 5.3 #2 and #6 checks."""
        info = self.members.get(f"data/{key}")
        where = f"member {self.prefix}data/{key}"
        if info is None:
            raise _Refused(f"has no {where} for storage {key!r}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Refused(f"has a compressed {where} (someone re-zipped it), which cannot be "
                           "memory-mapped and loads as garbage in torch.load(mmap=True)",
                           f"{_RESAVE}, which stores members uncompressed")
        if info.file_size != nbytes or info.compress_size != nbytes:
            raise _Refused(f"has {info.file_size} bytes in {where} where the pickle "
                           f"declares {nbytes}", _DAMAGED)
        head = info.header_offset
        if head + 30 > self.file_size:
            raise _Refused(f"has a local header for {where} past the end of the file", _DAMAGED)
        sig, _, flags, method, *_, nlen, xlen = struct.unpack("<4sHHHHHIIIHH", mm[head:head + 30])
        stored_name = bytes(mm[head + 30:head + 30 + nlen])
        want_name = info.orig_filename.encode("utf-8" if flags & 0x800 else "cp437")
        if sig != b"PK\x03\x04" or method != 0 or stored_name != want_name:
            raise _Refused(f"has a local header for {where} that does not match its directory",
                           _DAMAGED)
        start = head + 30 + nlen + xlen
        if start + nbytes > self.file_size:
            raise _Refused(f"has {where} reaching past the end of the file", _DAMAGED)
        if verify_crc and zlib.crc32(mm[start:start + nbytes]) != info.CRC:
            raise _Refused(f"has a CRC-32 mismatch in {where} (the data is corrupted)",
                           _DAMAGED)
        return start


def _refuse_non_zip(name: str, head: bytes) -> None:
    """Name what the file is when it is not a zip (section 4)."""
    if not head:
        raise CheckpointError(f"{name} is empty; {_DAMAGED}")
    if head[:4] == b"PK\x03\x04":
        return
    if head[2:14] == _LEGACY_MAGIC:
        what = "a legacy (non-zip) PyTorch checkpoint, which cannot be memory-mapped"
    elif head[257:262] == b"ustar":
        what = "a tar archive (a pre-1.0 PyTorch checkpoint or another kind of file)"
    else:
        what = "not a PyTorch zip checkpoint (an unknown or damaged file)"
    raise CheckpointError(f"{name} is {what}; {_RESAVE}")


def _build(ref: _TensorRef, mm, archive: _Archive, spans: dict, verify_crc: bool):
    store = ref.storage
    nbytes = store.numel * store.dtype.itemsize if store.dtype is not None else store.numel
    start = spans.get(store.key)
    if start is None:
        start = spans[store.key] = archive.storage_start(mm, store.key, nbytes, verify_crc)
    flat = mm[start:start + nbytes].view(ref.dtype)
    itemsize = ref.dtype.itemsize
    arr = np.lib.stride_tricks.as_strided(
        flat[ref.offset:], ref.shape, tuple(s * itemsize for s in ref.strides), writeable=False
    )
    if archive.byteorder == "big":
        arr = arr.byteswap()
        arr.flags.writeable = False
    return arr


def release_pages(arr: np.ndarray) -> bool:
    """Drop the pages behind a view read_pth returned from this process's resident set.

    Reading a mapped tensor faults its pages in, and they count in the RSS for as long as the
    mapping lives: converting a whole 2.9B checkpoint would leave 5.4 GiB resident. MADV_DONTNEED on
    a read-only file mapping only unmaps them (they stay in the page cache; a later read maps them
    again), so this is safe at any time. -> False when `arr` is not a view of a mapped file.
    """
    import mmap

    top = arr  # the np.memmap whose base is the mapping itself (its slices are np.memmaps too)
    while top is not None and not isinstance(getattr(top, "base", None), mmap.mmap):
        top = getattr(top, "base", None)
    if top is None or arr.size == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    mm = top.base
    lo = arr.ctypes.data - top.ctypes.data + top.offset % mmap.ALLOCATIONGRANULARITY
    hi = lo + sum((n - 1) * abs(s) for n, s in zip(arr.shape, arr.strides)) + arr.itemsize
    page = mmap.PAGESIZE
    lo, hi = lo // page * page, min(-(-hi // page) * page, len(mm))
    if lo < 0 or lo >= hi:
        return False
    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    return True


def _read(name: str, verify_crc: bool) -> dict[str, np.ndarray]:
    with open(name, "rb") as fh:
        file_size = os.fstat(fh.fileno()).st_size
        _refuse_non_zip(name, fh.read(512))
        mm = np.memmap(name, np.uint8, mode="r")
        with zipfile.ZipFile(fh) as zf:
            archive = _Archive(zf, file_size)
            refs = _unpickle(archive.record("data.pkl"))
            spans: dict[str, int] = {}
            return {k: _build(r, mm, archive, spans, verify_crc) for k, r in refs.items()}


def read_pth(path, *, verify_crc: bool = False) -> dict[str, np.ndarray]:
    """Map a torch zip checkpoint and return {name: read-only array view}, in file order.

    ``verify_crc`` also checks each storage's CRC-32 (torch never does): one full read of the
    data, no extra memory. Raises CheckpointError for anything unsafe or unreadable.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise CheckpointError(f"{name} does not exist or is not a file; "
                              "pass the path of a .pth checkpoint")
    try:
        return _read(name, verify_crc)
    except _Refused as exc:
        raise CheckpointError(f"{name} {exc}") from exc
    # zipfile, struct and the OS raise many types for a damaged or truncated archive.
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
            struct.error, NotImplementedError, OverflowError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{name} is a damaged or truncated zip checkpoint ({exc}); "
                              f"{_DAMAGED}") from exc
