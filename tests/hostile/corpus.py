"""A corpus of hostile and broken .pth checkpoints, written on demand into a test's tmp_path.

Each ``CHECKPOINTS`` entry is ``name -> (writer, words)``: ``writer(folder)`` writes one file into
``folder`` and returns its path, and ``words`` is what the one-sentence refusal must contain. Every
file is under 10 MB; the reader must refuse each within 10 s and 1 GB (issue 14).

The files are built from parts so each case changes one thing in an otherwise valid file:
  * ``Member`` and ``zip_bytes``: a zip writer that can lie (declared sizes and CRCs, deflated
    streams, members inside other members) where ``zipfile`` would not;
  * ``Tensor`` and ``pkl``: a torch-style ``data.pkl`` whose tensors can have any shape, stride,
    offset and storage; ``micro_parts`` gives a complete RWKV-7 state dict of a micro model (C=8) as
    such parts, which the cases then damage;
  * raw pickle opcodes where the attack is the pickle itself (shared references, nesting, memo).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import ml_dtypes
import numpy as np

from rwkv_opt.checkpoint.synth import SyntheticStateDict
from rwkv_opt.checkpoint.torchzip_write import _p_global, _p_int, _p_str, _p_tuple
from rwkv_opt.config import ModelConfig

MICRO = ModelConfig(n_layer=2, n_embd=8, head_size=4, vocab=16, dim_ffn=32, d_decay=2, d_aaa=2, d_mv=2, d_gate=2)
GIB = 1 << 30


# ---- zip ----------------------------------------------------------------------------------------


@dataclass
class Member:
    """One zip member. ``data`` is what the file holds (the deflate stream when ``method`` is 8);
    ``size`` and ``crc`` are what the headers declare (default: the truth for a stored member);
    ``at`` is the local header offset the directory declares (default: where this writer puts it);
    ``local=False`` lists the member in the directory only (its header must already be in the file)."""

    name: str
    data: bytes
    method: int = 0
    size: int | None = None
    crc: int | None = None
    at: int | None = None
    local: bool = True

    def fields(self) -> tuple[int, int, int, int, bytes]:
        """(method, crc, compressed size, size, name) as the headers declare them."""
        size = len(self.data) if self.size is None else self.size
        crc = zlib.crc32(self.data) if self.crc is None else self.crc
        return self.method, crc, len(self.data), size, self.name.encode()

    def local_header(self) -> bytes:
        method, crc, csize, size, name = self.fields()
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0x800, method, 0, 0, crc, csize, size, len(name), 0) + name


def zip_bytes(members: list[Member]) -> bytes:
    """A zip archive of ``members`` with a classic end record."""
    out, directory = bytearray(), bytearray()
    for m in members:
        offset = len(out) if m.at is None else m.at
        if m.local:
            out += m.local_header() + m.data
        method, crc, csize, size, name = m.fields()
        directory += (
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                20,
                20,
                0x800,
                method,
                0,
                0,
                crc,
                csize,
                size,
                len(name),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + name
        )
    n = min(len(members), 0xFFFF)  # readers walk the directory by its size; the count only overflows
    return bytes(out + directory + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(directory), len(out), 0))


def deflate_bomb(inflated: int) -> bytes:
    """A raw deflate stream of ``inflated`` zero bytes (a multiple of 1 MiB), about inflated/1000 long.

    Built without compressing anything large: after a full flush the compressor starts afresh, so
    each further MiB of zeros compresses to the same bytes, which are simply repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    mib = bytes(1 << 20)
    first = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    return first + again * (inflated // len(mib) - 1) + c.flush()


# ---- data.pkl -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """One ``_rebuild_tensor_v2`` call; stride None = contiguous, numel None = prod(shape)."""

    storage: str
    shape: tuple
    kind: str = "FloatStorage"
    stride: tuple | None = None
    offset: int = 0
    numel: int | None = None

    def pickled(self) -> bytes:
        stride = self.stride
        if stride is None:
            stride = tuple(math.prod(self.shape[i + 1 :]) for i in range(len(self.shape)))
        numel = math.prod(self.shape) if self.numel is None else self.numel
        pid = _p_tuple(
            [_p_str("storage"), _p_global("torch", self.kind), _p_str(self.storage), _p_str("cpu"), _p_int(numel)]
        )
        args = [
            pid + b"Q",
            _p_int(self.offset),
            _p_tuple(map(_p_int, self.shape)),
            _p_tuple(map(_p_int, stride)),
            b"\x89",
            _p_global("collections", "OrderedDict") + b")R",
        ]
        return _p_global("torch._utils", "_rebuild_tensor_v2") + _p_tuple(args) + b"R"


def pkl(entries: dict[str, bytes]) -> bytes:
    """A protocol-2 pickle of a dict whose values are already pickled (``Tensor.pickled()``)."""
    return b"\x80\x02}(" + b"".join(_p_str(k) + v for k, v in entries.items()) + b"u."


_KIND = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
}


@dataclass
class Parts:
    """A checkpoint under construction: tensors by key, storage bytes by storage key, and raw pickled
    values by key (for memo references) after the tensors."""

    tensors: dict[str, Tensor]
    storages: dict[str, bytes]
    raw: dict[str, bytes] = field(default_factory=dict)

    def members(self) -> dict[str, Member]:
        """data.pkl, version and every storage some tensor uses, by name inside the archive folder."""
        values = {k: t.pickled() for k, t in self.tensors.items()} | self.raw
        used = {t.storage for t in self.tensors.values()}
        return {
            "data.pkl": Member("", pkl(values)),
            "version": Member("", b"3\n"),
            **{f"data/{k}": Member("", v) for k, v in self.storages.items() if k in used},
        }

    def write(self, path: Path, **edits: Member) -> Path:
        """Write the file; ``edits`` replaces members by their name inside the archive folder."""
        members = self.members() | edits
        path.write_bytes(zip_bytes([replace(m, name=f"archive/{name}") for name, m in members.items()]))
        return path

    def set_array(self, key: str, arr: np.ndarray) -> Parts:
        """Replace (or add) ``key`` with ``arr`` in a storage of its own."""
        store = str(len(self.storages))
        self.storages[store] = np.ascontiguousarray(arr).tobytes()
        self.tensors[key] = Tensor(store, tuple(arr.shape), _KIND[np.dtype(arr.dtype)])
        return self


def micro_parts(dtype=np.float32, cfg: ModelConfig = MICRO) -> Parts:
    """A valid RWKV-7 state dict of a micro config (a few KB of weights)."""
    parts = Parts({}, {})
    for key, arr in SyntheticStateDict(cfg, seed=0, dtype="fp32").materialize().items():
        parts.set_array(key, arr.astype(dtype))
    return parts


def raw_pickle_file(path: Path, data: bytes) -> Path:
    """A well-formed checkpoint zip around an arbitrary ``data.pkl``."""
    path.write_bytes(zip_bytes([Member("archive/data.pkl", data), Member("archive/version", b"3\n")]))
    return path


# ---- hostile pickles ----------------------------------------------------------------------------


def _memo(i: int) -> tuple[bytes, bytes]:
    """(BINPUT i, BINGET i) for i < 256."""
    return b"q" + bytes([i]), b"h" + bytes([i])


def shared_lists(levels: int = 40) -> bytes:
    """{'emb.weight': L} with L_i = [L_(i-1), L_(i-1)]: ~9 bytes a level, 2^levels leaves expanded."""
    body = b"]" + _memo(0)[0]
    for i in range(levels):
        put, get = _memo(i + 1)[0], _memo(i)[1]
        body += b"]" + get + b"a" + get + b"a" + put
    return b"\x80\x02}" + _p_str("emb.weight") + body + b"s."


def shared_tuples(levels: int = 40, as_key: bool = True) -> bytes:
    """A dict keyed (or, as_key=False, a persistent id made) by T_i = (T_(i-1), T_(i-1)): hashing or
    printing T_40 visits 2^40 tuples."""
    body = b")" + _memo(0)[0]
    for i in range(levels):
        body += _memo(i)[1] * 2 + b"\x86" + _memo(i + 1)[0]
    if as_key:
        return b"\x80\x02}" + body + b"N" + b"s."
    return b"\x80\x02}" + _p_str("emb.weight") + body + b"Q" + b"s."


def deep_tuples(depth: int = 200_000) -> bytes:
    return b"\x80\x02}" + _p_str("emb.weight") + b"N" + b"\x85" * depth + b"s."


def deep_lists(depth: int = 200_000) -> bytes:
    return b"\x80\x02}" + _p_str("emb.weight") + b"]" * depth + b"a" * (depth - 1) + b"s."


def memo_slot(index: int = 0xFFFFFFF0) -> bytes:
    return b"\x80\x02}" + b"r" + struct.pack("<I", index) + b"."


def many_ops(n: int = 3_000_000) -> bytes:
    return b"\x80\x02](" + b"N" * n + b"e."


def mark_flood(n: int = 5_000_000) -> bytes:
    return b"\x80\x02" + b"(" * n + b"}."


def string_past_end() -> bytes:
    return b"\x80\x02}X" + struct.pack("<I", 0xFFFFFF00) + b"abc"


def tensor_pickle(**tensor) -> bytes:
    return pkl({"emb.weight": Tensor("0", **tensor).pickled()})


# ---- the corpus ---------------------------------------------------------------------------------

C = MICRO.n_embd
WIDE = replace(MICRO, n_embd=256)  # C x C matrices dominate: 8 of them are 2 MiB, the rest ~100 KiB


def _pickle_case(data: Callable[[], bytes]) -> Callable[[Path], Path]:
    return lambda folder: raw_pickle_file(folder / "hostile.pth", data())


def _parts_case(
    edit: Callable[[Parts], object], dtype=np.float32, cfg: ModelConfig = MICRO, **edits: Member
) -> Callable[[Path], Path]:
    """A micro file changed by ``edit(parts)`` (its return value is ignored) and member ``edits``."""

    def write(folder: Path) -> Path:
        parts = micro_parts(dtype, cfg)
        edit(parts)
        return parts.write(folder / "hostile.pth", **edits)

    return write


def _set(**arrays: np.ndarray) -> Callable[[Parts], None]:
    """Set keys given with '__' for '.' (blocks__0__att__r_k) or through a dict splat."""
    return lambda p: [p.set_array(k.replace("__", "."), np.asarray(a)) for k, a in arrays.items()]


def _broadcast_vocab(p: Parts) -> None:
    """emb and head of vocab 2^31 as stride-0 views of their own 16 rows: consistent shapes, 1 KiB of data."""
    for key in ("emb.weight", "head.weight"):
        p.tensors[key] = Tensor(p.tensors[key].storage, (1 << 31, C), stride=(0, 1), numel=MICRO.vocab * C)


def _shared_matrices(p: Parts) -> None:
    """Every C x C matrix of the WIDE model a view of one storage: each fits the file, together they do not."""
    first = p.tensors["blocks.0.att.receptance.weight"]
    for key, t in p.tensors.items():
        if t.shape == (WIDE.n_embd, WIDE.n_embd):
            p.tensors[key] = first


def _layer_flood(p: Parts, n: int = 100_000) -> None:
    """100,000 more keys blocks.<i>.att.x_r, all one memoized tensor: the file claims 100,002 layers."""
    p.raw["blocks.2.att.x_r"] = p.tensors["blocks.0.att.x_r"].pickled() + b"r" + struct.pack("<I", 1)
    p.raw |= {f"blocks.{i}.att.x_r": b"j" + struct.pack("<I", 1) for i in range(3, n + 2)}


def _header_past_end(folder: Path) -> Path:
    parts = micro_parts()
    return parts.write(folder / "hostile.pth", **{"data/0": Member("", parts.storages["0"], at=0xFFFFFF00)})


def _flip(member: str, at: int) -> Callable[[Path], Path]:
    """A valid bf16 micro file with one bit flipped in ``member``'s data, its CRC left as it was."""

    def write(folder: Path) -> Path:
        path = micro_parts(ml_dtypes.bfloat16).write(folder / "hostile.pth")
        raw = bytearray(path.read_bytes())
        name = f"archive/{member}".encode()
        raw[raw.index(name) + len(name) + at] ^= 0x04  # first occurrence: the local header, then the data
        path.write_bytes(bytes(raw))
        return path

    return write


def _overlapping_members(folder: Path) -> Path:
    """data/1's local header and data lie inside data/0's data: the overlapping-zip-bomb layout."""
    inner = Member("archive/data/1", bytes(16))
    outer = inner.local_header() + inner.data  # 44 + 16 bytes: 15 float32s
    tensors = {"a": Tensor("0", (len(outer) // 4,)).pickled(), "b": Tensor("1", (4,)).pickled()}
    members = [
        Member("archive/data.pkl", pkl(tensors)),
        Member("archive/version", b"3\n"),
        Member("archive/data/0", outer),
    ]
    first = zip_bytes(members)
    data0 = first.index(b"archive/data/0") + len("archive/data/0")
    path = folder / "hostile.pth"
    path.write_bytes(zip_bytes([*members, replace(inner, at=data0, local=False)]))
    return path


def _many_members(folder: Path, n: int = 80_000) -> Path:
    """80,000 empty members: an 8.6 MB directory for zipfile to parse."""
    members = [Member("archive/data.pkl", pkl({})), Member("archive/version", b"3\n")]
    members += [Member(f"archive/x/{i}", b"") for i in range(n)]
    path = folder / "hostile.pth"
    path.write_bytes(zip_bytes(members))
    return path


def _bomb(member: str, declared: int) -> Callable[[Path], Path]:
    """A valid micro file whose ``member`` is deflated: 1 GiB of zeros (1 MB compressed) declaring ``declared``."""

    def write(folder: Path) -> Path:
        bomb = Member("", deflate_bomb(GIB), method=8, size=declared, crc=0)
        return micro_parts().write(folder / "hostile.pth", **{member: bomb})

    return write


def _nan_key(p: Parts) -> None:
    p.set_array("blocks.1.att.key.weight", np.full((C, C), np.nan, ml_dtypes.bfloat16))


ONES = np.ones((1, 1, C), np.float32)
CHECKPOINTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    # pickle bombs: bounded by pickle_scan before the unpickler builds anything
    "shared_lists": (_pickle_case(shared_lists), "more than 4,194,304 objects"),
    "shared_tuple_key": (_pickle_case(shared_tuples), "more than 4,194,304 objects"),
    "shared_tuple_pid": (_pickle_case(lambda: shared_tuples(as_key=False)), "more than 4,194,304 objects"),
    "deep_tuples": (_pickle_case(deep_tuples), "more than 64 deep"),
    "deep_lists": (_pickle_case(deep_lists), "more than 64 deep"),
    "memo_slot": (_pickle_case(memo_slot), "memo slot 4,294,967,280"),
    "many_ops": (_pickle_case(many_ops), "more than 2,097,152 pickle opcodes"),
    "mark_flood": (_pickle_case(mark_flood), "more than 2,097,152 pickle opcodes"),
    "string_past_end": (_pickle_case(string_past_end), "ends inside an opcode's argument"),
    "binbytes": (_pickle_case(lambda: b"\x80\x03}X\x01\x00\x00\x00kC\x03abcs."), "SHORT_BINBYTES"),
    # compressed members: refused by declared size, never inflated past it
    "deflated_pkl_bomb": (_bomb("data.pkl", GIB), "1,073,741,824 bytes in member 'archive/data.pkl'"),
    "deflated_pkl_lying_size": (_bomb("data.pkl", 4096), "damaged"),
    "deflated_version_bomb": (_bomb("version", GIB), "1,073,741,824 bytes in member 'archive/version'"),
    "deflated_byteorder_lying_size": (_bomb("byteorder", 6), "damaged"),
    # shapes, offsets and counts beyond any real tensor
    "rank_40": (_pickle_case(lambda: tensor_pickle(shape=(1,) * 40)), "rank 40"),
    "elements_2_80": (
        _pickle_case(lambda: tensor_pickle(shape=(1 << 40, 1 << 40), stride=(0, 0), numel=1)),
        "beyond any real tensor",
    ),
    "offset_2_2000": (
        _pickle_case(lambda: tensor_pickle(shape=(4,), offset=1 << 2000, numel=4)),
        "beyond any real tensor",
    ),
    "numel_negative": (_pickle_case(lambda: tensor_pickle(shape=(1,), numel=-1)), "malformed storage reference"),
    # zip structure
    "overlapping_members": (_overlapping_members, "overlapping in the file"),
    "header_past_end": (_header_past_end, "past the end of the file"),
    "many_members": (_many_members, "has no 'emb.weight'"),
    # keys and layer indices
    "layer_flood": (_parts_case(_layer_flood), "missing key 'blocks.2.ln1.weight'"),
    "extra_block_100000000": (
        _parts_case(_set(**{"blocks.100000000.att.x_r": ONES})),
        "has blocks up to 100000000 but none for block 2",
    ),
    "block_index_5000_digits": (_parts_case(_set(**{"blocks." + "1" * 5000 + ".att.x_r": ONES})), "(5015 characters)"),
    "key_1m_chars": (_parts_case(_set(**{"k" * 1_000_000: ONES})), "(1000000 characters)"),
    "key_with_control_chars": (
        _parts_case(_set(**{"emb.weight\nsecond line\r\x1b[2J": ONES})),
        "unexpected key 'emb.weight\\nsecond line\\r\\x1b[2J'",
    ),
    # sizes against the file
    "vocab_2_31_stride_0": (_parts_case(_broadcast_vocab), "(2147483648, 8)"),
    "overlapping_views": (_parts_case(_shared_matrices, cfg=WIDE), "share their data"),
    # dimensions and ranks
    "vocab_0": (
        _parts_case(_set(emb__weight=np.ones((0, C), np.float32), head__weight=np.ones((0, C), np.float32))),
        "'emb.weight' has shape (0, 8)",
    ),
    "emb_1d": (_parts_case(_set(emb__weight=np.ones(MICRO.vocab * C, np.float32))), "'emb.weight' has shape (128,)"),
    "r_k_3d": (
        _parts_case(_set(blocks__0__att__r_k=np.ones((1, 2, 4), np.float32))),
        "'blocks.0.att.r_k' has shape (1, 2, 4)",
    ),
    "ffn_key_0d": (
        _parts_case(_set(blocks__0__ffn__key__weight=np.float32(1))),
        "'blocks.0.ffn.key.weight' has shape ()",
    ),
    "lora_rank_0": (
        _parts_case(_set(blocks__0__att__w1=np.ones((C, 0), np.float32))),
        "'blocks.0.att.w1' has shape (8, 0)",
    ),
    # values and integrity
    "nan_bf16": (_parts_case(_nan_key, ml_dtypes.bfloat16), "'blocks.1.att.key.weight' holds nan at flat index 0"),
    "inf_fp16": (
        _parts_case(_set(head__weight=np.full((MICRO.vocab, C), np.inf, np.float16)), np.float16),
        "'head.weight' holds inf",
    ),
    "neg_inf_fp32": (
        _parts_case(_set(ln_out__bias=np.array([0, 0, 0, -np.inf, 0, 0, 0, 0], np.float32))),
        "'ln_out.bias' holds -inf at flat index 3",
    ),
    "bit_flip_weight": (_flip("data/7", 3), "CRC-32 mismatch in member 'archive/data/7'"),
    "bit_flip_pickle": (_flip("data.pkl", 40), "damaged"),
    "int64_weights": (_parts_case(_set(ln_out__weight=np.arange(C))), "has dtype int64"),
}
