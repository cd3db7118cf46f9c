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
  * bounded cost whatever the file says (issue 14): ``data.pkl`` is read through a size cap and
    dry-run by ``pickle_scan`` (opcode count, memo slots, nesting, expanded size) before the C
    unpickler sees it; small records are capped at a few KiB however they are compressed; shapes
    are short tuples of bounded ints; storage members may not overlap; no structure from the file is
    ever repr()'d into a message (``bounds.excerpt``). Refusing any file under 10 MB takes well
    under a second and a few MiB.
  * integrity by default: ``read_pth`` checks every storage member's CRC-32 in one sequential read
    (torch never does). ``open_pth`` separates the cheap structural read from that pass, so a caller
    can validate shapes first and then, in the same pass, also hash the whole file
    (``MappedPth.verify(digest)``): the pipeline's sha256 and the CRC cost one read of the file.
"""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from isal.isal_zlib import crc32  # zlib.crc32's result, 5-8x faster: the CRC pass runs at disk speed

from rwkv_opt.checkpoint.bounds import MAX_ELEMENTS, element_count, excerpt
from rwkv_opt.checkpoint.pickle_scan import PickleRefused, scan
from rwkv_opt.checkpoint.streamwrite import release_pages
from rwkv_opt.checkpoint.torchzip_write import write_pth
from rwkv_opt.errors import CheckpointError

__all__ = ["MappedPth", "open_pth", "read_pth", "release_pages", "write_pth"]

MAX_PICKLE_BYTES = 64 << 20  # data.pkl of a 7.2B RWKV-7a state dict is ~0.2 MB
MAX_RECORD_BYTES = 4096  # version, byteorder and the other text records are a few bytes
_PASS_CHUNK = 4 << 20  # bytes per read in the CRC/digest pass

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
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "DoubleStorage": np.dtype("<f8"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
}
_V3_DTYPES = {  # dtype globals of _rebuild_tensor_v3; its UntypedStorage numel counts bytes
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
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


def _is_count(x) -> bool:
    """An int in 0..MAX_ELEMENTS: offsets, strides and numels beyond that fit no file."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_ELEMENTS


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
        return f"storage {excerpt(self.key)}"


class _TensorRef(_Inert):
    """Placeholder returned by the rebuild functions; arrays are made after unpickling."""

    __slots__ = ("storage", "dtype", "offset", "shape", "strides")

    def __init__(self, storage, dtype, offset, shape, strides):
        self.storage, self.dtype = storage, dtype
        self.offset, self.shape, self.strides = offset, shape, strides

    def __repr__(self):
        return "a tensor"


def _tensor(storage, offset, size, stride, requires_grad, hooks, dtype):
    """The checks shared by the v2 and v3 rebuild forms (section 5.3 #3)."""
    if not isinstance(storage, _StorageRef):
        raise _Refused(f"rebuilds a tensor from {excerpt(storage)} instead of a storage")
    ok = (
        isinstance(offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(v, int) for v in size + stride)
        and isinstance(requires_grad, bool)
        and isinstance(hooks, _OrderedDict)
        and not hooks
    )
    if not ok:
        raise _Refused("has a tensor whose offset, size, stride or hooks are malformed")
    if offset < 0 or min(size + stride, default=0) < 0:
        raise _Refused("has a tensor with a negative offset, size or stride")
    if element_count(size) is None or not all(_is_count(v) for v in (offset, *stride)):
        raise _Refused(
            f"has a tensor of rank {len(size)} whose size, stride or offset is beyond any "
            f"real tensor (at most rank 32 and {MAX_ELEMENTS:,} elements)"
        )
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
        raise _Refused(f"has storage {storage.key!r} whose byte count is not a whole number of {dtype.name} values")
    return _tensor(storage, offset, size, stride, requires_grad, hooks, dtype.dtype)


def _rebuild_parameter(data, requires_grad, hooks):
    if not (
        isinstance(data, _TensorRef)
        and isinstance(requires_grad, bool)
        and isinstance(hooks, _OrderedDict)
        and not hooks
    ):
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
            raise _Refused(
                f"wants to load {excerpt(f'{module}.{name}')}, which a weights file never needs",
                "the file may be malicious, so do not open it with torch.load(weights_only=False) either",
            )
        return obj

    def persistent_load(self, pid):
        ok = (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _Marker)
            and pid[1].name.endswith("Storage")
            and isinstance(pid[2], str)
            and isinstance(pid[3], str)
            and _is_count(pid[4])
        )
        if not ok:
            raise _Refused("has a malformed storage reference (want ('storage', <Kind>Storage, key, location, numel))")
        ref = _StorageRef(pid[2], pid[1].dtype, pid[4])
        seen = self.storages.setdefault(ref.key, ref)
        if (seen.dtype, seen.numel) != (ref.dtype, ref.numel):
            raise _Refused(f"declares storage {ref.key!r} twice with different types or sizes")
        return seen


def _reason(exc: BaseException) -> str:
    """An exception's text for a message: one line, clipped (it may quote bytes from the file)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 120 else text[:120] + "..."


def _unpickle(data: bytes) -> dict:
    try:
        scan(data, _ALLOWED_OPCODES)  # bounded dry run first: see pickle_scan
    except PickleRefused as exc:
        what = "a damaged data.pkl that" if exc.damaged else "a data.pkl that"
        raise _Refused(f"has {what} {exc}", _DAMAGED if exc.damaged else _ONLY_TENSORS) from exc
    try:
        obj = _Unpickler(data).load()
    except _Refused:
        raise
    # A hostile or damaged pickle can make the unpickler raise nearly any exception type.
    except Exception as exc:
        raise _Refused(f"has a data.pkl that cannot be unpickled ({_reason(exc)})") from exc
    if not isinstance(obj, dict):
        raise _Refused(f"holds {type(obj).__name__}, not a dict of tensors")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise _Refused(f"has a key of type {type(key).__name__}, not a string")
        if not isinstance(value, _TensorRef):
            raise _Refused(
                f"maps {excerpt(key)} to {type(value).__name__}, not a tensor (only flat name -> tensor dicts are read)"
            )
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
            raise _Refused(f"has member {excerpt(stray[0])} outside its archive folder {excerpt(self.prefix)}")
        self.members = {i.filename[len(self.prefix) :]: i for i in infos}
        if "data.pkl" not in self.members:
            raise _Refused(f"has no {excerpt(self.prefix + 'data.pkl')} member")
        version = self.record(".data/version") or self.record("version")
        if version is None or not version.strip().isdigit() or not 1 <= int(version) <= 10:
            found = "none" if version is None else excerpt(version)
            raise _Refused(f"has a missing or unsupported format version record ({found}; torch writes 1 to 10)")
        self.byteorder = (self.record("byteorder") or b"little").decode("ascii").strip()
        if self.byteorder not in ("little", "big"):
            raise _Refused(f"has an unknown byteorder record {excerpt(self.byteorder)}")

    def where(self, member: str) -> str:
        return f"member {excerpt(self.prefix + member)}"

    def record(self, member: str, cap: int = MAX_RECORD_BYTES) -> bytes | None:
        """A small member, read through zipfile (which checks its CRC-32), refused when it declares
        more than ``cap`` bytes, and never inflated past its declared size."""
        info = self.members.get(member)
        if info is None:
            return None
        if info.file_size > cap:
            raise _Refused(
                f"has {info.file_size:,} bytes in {self.where(member)} (after "
                f"decompression), above the {cap:,} it can need",
                _DAMAGED,
            )
        # read(n) inflates at most n bytes at a time and stops at the declared size, where it checks
        # the CRC. read() (and zf.read) inflates the whole stream in one call: 1 GiB for a 1 MB record.
        with self.zf.open(info) as fh:
            return fh.read(info.file_size)

    def storage_span(self, mm: np.ndarray, key: str, nbytes: int) -> tuple[int, int, int, str]:
        """(file offset, size, CRC-32, member) of data/<key>'s bytes, after the section 5.3 #2 and #6
        checks."""
        info = self.members.get(f"data/{key}")
        where = self.where(f"data/{key}")
        if info is None:
            raise _Refused(f"has no {where} for storage {excerpt(key)}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Refused(
                f"has a compressed {where} (someone re-zipped it), which cannot be "
                "memory-mapped and loads as garbage in torch.load(mmap=True)",
                f"{_RESAVE}, which stores members uncompressed",
            )
        if info.file_size != nbytes or info.compress_size != nbytes:
            raise _Refused(f"has {info.file_size:,} bytes in {where} where the pickle declares {nbytes:,}", _DAMAGED)
        head = info.header_offset
        if head + 30 > self.file_size:
            raise _Refused(f"has a local header for {where} past the end of the file", _DAMAGED)
        sig, _, flags, method, *_, nlen, xlen = struct.unpack("<4sHHHHHIIIHH", mm[head : head + 30])
        stored_name = bytes(mm[head + 30 : head + 30 + nlen])
        want_name = info.orig_filename.encode("utf-8" if flags & 0x800 else "cp437")
        if sig != b"PK\x03\x04" or method != 0 or stored_name != want_name:
            raise _Refused(f"has a local header for {where} that does not match its directory", _DAMAGED)
        start = head + 30 + nlen + xlen
        if start + nbytes > self.file_size:
            raise _Refused(f"has {where} reaching past the end of the file", _DAMAGED)
        return start, nbytes, info.CRC, where


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


def _build(ref: _TensorRef, data: np.ndarray, archive: _Archive, spans: dict) -> np.ndarray:
    """The read-only view of ``ref`` in ``data`` (the whole mapped file as a plain uint8 array).

    ``np.ndarray(buffer=...)`` rather than slicing the np.memmap and ``as_strided``: 2 us instead of
    20 us a tensor, which matters for a file of 60,000 tensor records; it re-checks the bounds too.
    """
    store = ref.storage
    nbytes = store.numel * store.dtype.itemsize if store.dtype is not None else store.numel
    if store.key not in spans:
        spans[store.key] = archive.storage_span(data, store.key, nbytes)
    itemsize = ref.dtype.itemsize
    arr = np.ndarray(
        ref.shape,
        ref.dtype,
        buffer=data,
        offset=spans[store.key][0] + ref.offset * itemsize,
        strides=tuple(s * itemsize for s in ref.strides),
    )
    if archive.byteorder == "big":
        arr = arr.byteswap()
        arr.flags.writeable = False
    return arr


def _disjoint(spans) -> list[tuple[int, int, int, str]]:
    """The non-empty storage spans by file offset, refusing two that share bytes: torch never writes
    that, and overlapping members are how a small zip claims far more data than it holds."""
    out = sorted(s for s in spans if s[1])
    for before, after in itertools.pairwise(out):
        if after[0] < before[0] + before[1]:
            raise _Refused(f"has {before[3]} and {after[3]} overlapping in the file", _DAMAGED)
    return out


def _regions(fh, ranges):
    """(file offset, memoryview) pieces of the byte ``ranges``, in order, read into one reused buffer."""
    buf = memoryview(bytearray(_PASS_CHUNK))
    for lo, hi in ranges:
        fh.seek(lo)
        pos = lo
        while pos < hi:
            n = fh.readinto(buf[: min(_PASS_CHUNK, hi - pos)])
            if not n:
                raise _Refused("became shorter while it was read", _DAMAGED)
            yield pos, buf[:n]
            pos += n


def _verify(fh, spans: list, file_size: int, digest) -> None:
    """One sequential read: each span's CRC-32, and (with ``digest``) every byte of the file hashed."""
    ranges = [(0, file_size)] if digest is not None else [(s[0], s[0] + s[1]) for s in spans]
    todo = iter(spans)
    current, crc = next(todo, None), 0
    for pos, chunk in _regions(fh, ranges):
        if digest is not None:
            digest.update(chunk)
        end = pos + len(chunk)
        while current is not None and current[0] < end:
            start, nbytes, want, where = current
            crc = crc32(chunk[max(start, pos) - pos : min(start + nbytes, end) - pos], crc)
            if start + nbytes > end:
                break  # the span goes on in the next piece
            if crc != want:
                raise _Refused(f"has a CRC-32 mismatch in {where} (the data is corrupted)", _DAMAGED)
            current, crc = next(todo, None), 0


@contextlib.contextmanager
def _refusals(name: str):
    """Turn every way a hostile or damaged file can fail into one CheckpointError naming it."""
    try:
        yield
    except _Refused as exc:
        raise CheckpointError(f"{name} {exc}") from exc
    # zipfile, struct and the OS raise many types for a damaged or truncated archive.
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        ValueError,
        struct.error,
        NotImplementedError,
        OverflowError,
        KeyError,
        RuntimeError,
    ) as exc:
        raise CheckpointError(f"{name} is a damaged or truncated zip checkpoint ({_reason(exc)}); {_DAMAGED}") from exc


@dataclass
class MappedPth:
    """A checkpoint mapped by ``open_pth``: its tensors, and the one pass that checks its integrity."""

    path: str
    file_size: int
    tensors: dict[str, np.ndarray]
    spans: list[tuple[int, int, int, str]]  # (file offset, size, CRC-32, member) per storage, by offset

    def verify(self, digest=None) -> None:
        """Check every storage member's CRC-32 (torch never does) in one sequential read of the file.

        ``digest`` (a hashlib object) is fed every byte of the file in the same read, so a caller that
        wants the file's hash pays for one read, not two. No private memory beyond a 4 MiB buffer.
        """
        with _refusals(self.path), open(self.path, "rb") as fh:
            _verify(fh, self.spans, self.file_size, digest)


def _map(name: str) -> MappedPth:
    with open(name, "rb") as fh:
        file_size = os.fstat(fh.fileno()).st_size
        _refuse_non_zip(name, fh.read(512))
        data = np.memmap(name, np.uint8, mode="r").view(np.ndarray)  # read-only; release_pages finds the map
        with zipfile.ZipFile(fh) as zf:
            archive = _Archive(zf, file_size)
            refs = _unpickle(archive.record("data.pkl", MAX_PICKLE_BYTES))
            spans: dict[str, tuple] = {}
            views: dict[int, np.ndarray] = {}  # one view per tensor record, however many keys share it
            for ref in refs.values():
                if id(ref) not in views:
                    views[id(ref)] = _build(ref, data, archive, spans)
            tensors = {k: views[id(r)] for k, r in refs.items()}
    return MappedPth(name, file_size, tensors, _disjoint(spans.values()))


def open_pth(path) -> MappedPth:
    """Map a torch zip checkpoint and check everything but its bytes' integrity (no full read).

    The tensors are read-only views, in file order. Call ``verify`` before trusting their values.
    Raises CheckpointError for anything unsafe or unreadable.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise CheckpointError(f"{name} does not exist or is not a file; pass the path of a .pth checkpoint")
    with _refusals(name):
        return _map(name)


def read_pth(path, *, verify_crc: bool = True) -> dict[str, np.ndarray]:
    """Map a torch zip checkpoint and return {name: read-only array view}, in file order.

    ``verify_crc`` (the default) checks each storage's CRC-32, which torch never does: one full read
    of the data, no extra memory. Raises CheckpointError for anything unsafe, unreadable or corrupt.
    """
    mapped = open_pth(path)
    if verify_crc:
        mapped.verify()
    return mapped.tensors
