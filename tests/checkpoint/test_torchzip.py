"""rwkv_opt.checkpoint.torchzip against real torch: read, write, refuse, and stay zero-copy.

Torch is the oracle here (imported by the tests only); the module under test never imports it.
Loading by the official ``rwkv`` package is tested elsewhere.
"""

from __future__ import annotations

import gc
import io
import os
import pickle
import pickletools
import struct
import tarfile
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest

from rwkv_opt.checkpoint import torchzip, torchzip_write
from rwkv_opt.checkpoint.torchzip import read_pth, write_pth
from rwkv_opt.errors import CheckpointError, RwkvOptError

torch = pytest.importorskip("torch")

NP_DTYPE = {
    torch.float32: np.dtype("float32"),
    torch.float16: np.dtype("float16"),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.float64: np.dtype("float64"),
    torch.int64: np.dtype("int64"),
    torch.int32: np.dtype("int32"),
    torch.int16: np.dtype("int16"),
    torch.int8: np.dtype("int8"),
    torch.uint8: np.dtype("uint8"),
    torch.bool: np.dtype("bool"),
    torch.uint16: np.dtype("uint16"),
}


def torch_bits(t) -> np.ndarray:
    """The bytes of a tensor's values in row-major order."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def np_bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def assert_same(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for k, t in theirs.items():
        a = ours[k]
        assert a.dtype == NP_DTYPE[t.dtype], k
        assert a.shape == tuple(t.shape), k
        assert np.array_equal(np_bits(a), torch_bits(t)), k


def refused(path, *, verify_crc=True) -> str:
    """Read ``path`` expecting a refusal; returns the message after checking its form."""
    with pytest.raises(CheckpointError) as info:
        read_pth(path, verify_crc=verify_crc)
    msg = str(info.value)
    assert isinstance(info.value, RwkvOptError)
    assert os.path.basename(str(path)) in msg and "\n" not in msg
    return msg


# ---- reading torch.save output ---------------------------------------------------------------


def _samples():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    flat = torch.randn(40, generator=g).bfloat16()
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    return {
        "dtypes": {
            "blocks.0.att.x_r": torch.randn(1, 1, 128, generator=g).bfloat16(),
            "fp16": torch.randn(3, 5, generator=g).half(),
            "fp32": torch.randn(7, generator=g),
            "i64": torch.arange(-5, 7),
            "u16_v3": torch.arange(5, dtype=torch.int32).to(torch.uint16),
        },
        "scalar_empty": {
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 3),
            "empty_bf16": torch.zeros(3, 0).bfloat16(),
        },
        "views": {
            "base": base,
            "t": base.t(),
            "sub": base[1:3, 2:5],
            "row": base[2],
            "expand": torch.arange(3.0).expand(4, 3),
            "a": flat[:10].view(2, 5),
            "b": flat[10:40:3],
        },
        "params": {
            "w": torch.nn.Parameter(torch.randn(3, 3, generator=g)),
            "b": torch.nn.Parameter(torch.zeros(3).bfloat16(), requires_grad=False),
        },
        "ordered": OrderedDict([("z", torch.ones(2)), ("a", torch.zeros(2, dtype=torch.int64))]),
        "state_dict": model.state_dict(),
    }


@pytest.mark.parametrize("sample", list(_samples()))
def test_reader_equals_torch_load(tmp_path, sample):
    path = tmp_path / f"{sample}.pth"
    torch.save(_samples()[sample], path)
    theirs = torch.load(path, weights_only=True)
    ours = read_pth(path, verify_crc=True)
    assert_same(ours, theirs)
    for k, t in theirs.items():
        a = ours[k]
        assert not a.flags.writeable and type(a) is np.ndarray
        if t.numel() > 1:
            assert a.strides == tuple(s * t.element_size() for s in t.stride()), k
    if sample == "views":
        assert np.shares_memory(ours["base"], ours["sub"])
        start = {k: ours[k].__array_interface__["data"][0] for k in ("a", "b")}
        assert start["b"] - start["a"] == 10 * 2  # one bf16 storage, element offset 10
        assert ours["sub"].strides == (24, 4) and ours["expand"].strides[0] == 0
    if sample == "state_dict":
        ops = {op.name for op, _, _ in pickletools.genops(zipfile.ZipFile(path).read("state_dict/data.pkl"))}
        assert "BUILD" in ops  # the _metadata attribute is in the file and was dropped


def test_reader_byteorder_big_swaps_like_torch(tmp_path):
    src, dst = tmp_path / "src.pth", tmp_path / "big.pth"
    torch.save({"x": torch.arange(6.0).bfloat16(), "y": torch.arange(3, dtype=torch.int32)}, src)
    rezip(src, dst, replace={"byteorder": b"big"})
    assert_same(read_pth(dst), torch.load(dst, weights_only=True))


# ---- writing -----------------------------------------------------------------------------------


def _arrays():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    return {
        "emb.weight": rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16),
        "blocks.0.att.x_r": rng.standard_normal((1, 1, 8)).astype(np.float16),
        "w": w,
        "w.T": w.T,
        "f64": rng.standard_normal(3),
        "i64": np.arange(-3, 3),
        "i32": np.arange(4, dtype=np.int32),
        "i16": np.arange(4, dtype=np.int16),
        "i8": np.arange(-4, 4, dtype=np.int8),
        "u8": np.arange(250, 256, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "big_endian": np.arange(5, dtype=">f4"),
        "scalar": np.float32(1.5),
        "empty": np.zeros((0, 4), np.float32),
    }


def member_data_offsets(path) -> dict[str, int]:
    raw = open(path, "rb").read()
    out = {}
    for info in zipfile.ZipFile(path).infolist():
        nlen, xlen = struct.unpack_from("<HH", raw, info.header_offset + 26)
        out[info.filename] = info.header_offset + 30 + nlen + xlen
    return out


@pytest.mark.parametrize("mode", ["weights_only", "mmap", "full_unpickler", "computed_offsets"])
def test_writer_output_loads_in_torch(tmp_path, mode, monkeypatch):
    arrays = _arrays()
    path = tmp_path / "nested" / "dir" / "rwkv-x.pth"
    write_pth(path, arrays)
    config = torch.utils.serialization.config.load
    # computed_offsets: with mmap, torch predicts each storage offset from miniz's layout rules
    # instead of reading local headers, and the debug flag asserts the prediction (§6.3).
    config.calculate_storage_offsets = mode == "computed_offsets"
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    try:
        loaded = torch.load(path, weights_only=mode != "full_unpickler", mmap=mode in ("mmap", "computed_offsets"))
    finally:
        config.calculate_storage_offsets = False
    assert list(loaded) == list(arrays)
    for k, a in arrays.items():
        assert loaded[k].dtype == {v: k for k, v in NP_DTYPE.items()}[a.dtype.newbyteorder("=")]
        assert tuple(loaded[k].shape) == np.shape(a)
        assert np.array_equal(
            torch_bits(loaded[k]), np_bits(np.asarray(a).astype(np.asarray(a).dtype.newbyteorder("<")))
        ), k


def test_writer_layout(tmp_path):
    path = tmp_path / "my model.pth"
    write_pth(path, _arrays())
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        assert zf.read("my model/version") == b"3\n"
        assert zf.read("my model/byteorder") == b"little"
    n = len(_arrays())
    assert names == [
        "my model/" + m
        for m in [
            "data.pkl",
            ".format_version",
            ".storage_alignment",
            "byteorder",
            *[f"data/{i}" for i in range(n)],
            "version",
            ".data/serialization_id",
        ]
    ]
    assert all(ofs % 64 == 0 for ofs in member_data_offsets(path).values())
    raw = open(path, "rb").read()
    assert raw[-22 - 20 : -22][:4] == b"PK\x06\x07"  # zip64 locator, as torch always writes
    ops = {op.name for op, _, _ in pickletools.genops(zipfile.ZipFile(path).read("my model/data.pkl"))}
    assert ops <= {
        "PROTO",
        "STOP",
        "MARK",
        "EMPTY_DICT",
        "EMPTY_TUPLE",
        "TUPLE",
        "TUPLE1",
        "TUPLE2",
        "TUPLE3",
        "BINUNICODE",
        "GLOBAL",
        "BINPERSID",
        "BININT1",
        "BININT2",
        "BININT",
        "LONG1",
        "NEWFALSE",
        "REDUCE",
        "SETITEMS",
    }


def test_writer_round_trip_and_empty_dict(tmp_path):
    arrays = _arrays()
    write_pth(tmp_path / "a.pth", arrays)
    back = read_pth(tmp_path / "a.pth", verify_crc=True)
    assert list(back) == list(arrays)
    for k, a in arrays.items():
        assert back[k].dtype == np.asarray(a).dtype.newbyteorder("=") and back[k].shape == a.shape
        assert np.array_equal(back[k], a), k
    write_pth(tmp_path / "none.pth", {})
    assert read_pth(tmp_path / "none.pth") == {} == torch.load(tmp_path / "none.pth")


def test_writer_zip64_fields(tmp_path, monkeypatch):
    """Force the zip64 forms (used above 4 GiB) on a small file: zipfile and torch accept them."""
    monkeypatch.setattr(torchzip_write, "_ZIP64_LIMIT", 0)
    arrays = _arrays()
    path = tmp_path / "z64.pth"
    write_pth(path, arrays)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
    assert all(ofs % 64 == 0 for ofs in member_data_offsets(path).values())
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert all(np.array_equal(torch_bits(loaded[k]), np_bits(read_pth(path)[k])) for k in arrays)


def test_writer_is_atomic_and_refuses_bad_input(tmp_path, monkeypatch):
    path = tmp_path / "out.pth"
    write_pth(path, {"a": np.ones(3, np.float32)})
    before = path.read_bytes()

    def broken(a):
        yield np.zeros(1, np.uint8)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torchzip_write, "_tensor_chunks", broken)
    with pytest.raises(CheckpointError, match="out.pth.*No space left"):
        write_pth(path, {"a": np.ones(3, np.float32)})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["out.pth"]
    for bad, why in [
        ({"u": np.arange(3, dtype=np.uint16)}, "uint16"),
        ({"o": np.array([None])}, "object"),
        ({"l": [1.0]}, "list"),
        ({3: np.ones(1)}, "not a string"),
    ]:
        with pytest.raises(CheckpointError, match=f"new.pth.*{why}"):
            write_pth(tmp_path / "new.pth", bad)
    assert os.listdir(tmp_path) == ["out.pth"]


# ---- refusals ----------------------------------------------------------------------------------


def rezip(src, dst, *, method=zipfile.ZIP_STORED, replace=None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", method) as zout:
        for info in zin.infolist():
            data = (replace or {}).get(info.filename.split("/", 1)[1], zin.read(info))
            zout.writestr(info.filename, data)


def pack(path, pkl: bytes, data: dict[str, bytes] | None = None, version=b"3\n", prefix="evil"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", pkl)
        zf.writestr(f"{prefix}/version", version)
        for key, raw in (data or {}).items():
            zf.writestr(f"{prefix}/data/{key}", raw)
    return path


class FakeStorage:
    def __init__(self, key="0", numel=4, kind=None, pid=None):
        self.pid = pid or ("storage", kind or torch.FloatStorage, key, "cpu", numel)


class FakeTensor:
    def __init__(self, storage, offset=0, size=(4,), stride=(1,), state=None):
        self.args = (storage, offset, size, stride, False, OrderedDict())
        self.state = state


class Forger(pickle.Pickler):
    """Writes torch-style pickles with arbitrary (possibly hostile) tensor arguments."""

    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, FakeStorage) else None

    def reducer_override(self, obj):
        if isinstance(obj, FakeTensor):
            rebuild = torch._utils._rebuild_tensor_v2
            return (rebuild, obj.args) if obj.state is None else (rebuild, obj.args, obj.state)
        return NotImplemented


def forge(obj) -> bytes:
    buf = io.BytesIO()
    Forger(buf, protocol=2).dump(obj)
    return buf.getvalue()


class Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("protocol", [2, 4])
def test_refuses_os_system_payload_without_running_it(tmp_path, protocol):
    live, marker = tmp_path / "live", tmp_path / "pwned"
    pickle.loads(pickle.dumps(Evil(os.system, f"touch '{live}'"), protocol=2))
    assert live.exists()  # the payload is real ...
    pkl = pickle.dumps({"w": Evil(os.system, f"touch '{marker}'")}, protocol=protocol)
    msg = refused(pack(tmp_path / "system.pth", pkl))
    assert "posix.system" in msg and not marker.exists()  # ... and the reader never runs it


def test_refuses_builtins_eval(tmp_path):
    marker = tmp_path / "pwned"
    pkl = pickle.dumps({"w": Evil(eval, f"open({str(marker)!r}, 'w')")}, protocol=2)
    assert "__builtin__.eval" in refused(pack(tmp_path / "eval.pth", pkl))  # protocol-2 name
    assert not marker.exists()


F4 = np.arange(4, dtype=np.float32).tobytes()
FORGED = {  # name: (pickled object, storage members, expected words in the message)
    "ok": ({"t": FakeTensor(FakeStorage())}, {"0": F4}, None),
    "oob_stride": ({"t": FakeTensor(FakeStorage(), stride=(1_000_000,))}, {"0": F4}, "past the end"),
    "oob_offset": ({"t": FakeTensor(FakeStorage(), offset=1, size=(4,))}, {"0": F4}, "past the end"),
    "negative_stride": ({"t": FakeTensor(FakeStorage(), stride=(-1,))}, {"0": F4}, "negative"),
    "lying_numel": ({"t": FakeTensor(FakeStorage(numel=10), size=(10,))}, {"0": F4}, "16 bytes"),
    "missing_member": ({"t": FakeTensor(FakeStorage(key="7"))}, {"0": F4}, "no member"),
    "bad_pid": ({"t": FakeTensor(FakeStorage(pid=("storage", "x", "0", "cpu", 4)))}, {"0": F4}, "malformed storage"),
    "two_sizes": (
        {"a": FakeTensor(FakeStorage()), "b": FakeTensor(FakeStorage(numel=2), size=(2,))},
        {"0": F4},
        "twice",
    ),
    "build_on_tensor": ({"t": FakeTensor(FakeStorage(), state={"x": 1})}, {"0": F4}, "state"),
    "not_a_tensor": ({"epoch": 3}, {}, "int, not a tensor"),
    "not_a_dict": ([1, 2], {}, "list"),
    "bytes_opcode": (b"abc", {}, "BINBYTES"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_refuses_forged_tensors(tmp_path, case):
    obj, data, expect = FORGED[case]
    pkl = pickle.dumps(obj, protocol=3) if case == "bytes_opcode" else forge(obj)
    path = pack(tmp_path / f"{case}.pth", pkl, data)
    if expect is None:  # the control: a well-formed forged file loads in both readers
        assert np.array_equal(read_pth(path)["t"], np.arange(4, dtype=np.float32))
        assert torch.load(path, weights_only=True)["t"].tolist() == [0, 1, 2, 3]
    else:
        assert expect in refused(path)


@pytest.mark.parametrize("case", ["version_11", "no_version", "mixed_prefix", "no_folder"])
def test_refuses_bad_zip_structure(tmp_path, case):
    pkl = forge({"t": FakeTensor(FakeStorage())})
    path = tmp_path / f"{case}.pth"
    if case == "version_11":
        pack(path, pkl, {"0": F4}, version=b"11")
    elif case == "no_version":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("a/data.pkl", pkl)
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("a/data.pkl" if case == "mixed_prefix" else "data.pkl", pkl)
            zf.writestr("b/version", b"3")
    refused(path)


def test_refuses_other_file_kinds(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert "legacy" in refused(legacy)
    tar = tmp_path / "old.tar"
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("sys_info")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    assert "tar archive" in refused(tar)
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty" in refused(tmp_path / "empty.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 100)
    assert "not a PyTorch zip checkpoint" in refused(tmp_path / "junk.pth")
    assert "does not exist" in refused(tmp_path / "missing.pth")


def test_refuses_truncated_files(tmp_path):
    src = tmp_path / "full.pth"
    torch.save({"a": torch.arange(100.0), "b": torch.ones(3, 3).bfloat16()}, src)
    raw = src.read_bytes()
    for cut in [1, 3, 4, 30, 64, 200, len(raw) // 2, len(raw) - 100, len(raw) - 22, len(raw) - 1]:
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(raw[:cut])
        refused(path)


def test_refuses_deflated_rezip(tmp_path):
    src, dst = tmp_path / "src.pth", tmp_path / "deflated.pth"
    torch.save({"w": torch.zeros(1000)}, src)
    rezip(src, dst, method=zipfile.ZIP_DEFLATED)
    assert "compressed" in refused(dst)


def test_crc_checks(tmp_path):
    path = tmp_path / "flip.pth"
    torch.save({"w": torch.zeros(64)}, path)
    ofs = member_data_offsets(path)["flip/data/0"]
    raw = bytearray(path.read_bytes())
    raw[ofs + 5] ^= 0x10
    path.write_bytes(raw)
    assert read_pth(path, verify_crc=False)["w"].view(np.uint32)[1] == 0x1000  # opted out: like torch
    assert "CRC-32" in refused(path)  # checked by default
    pkl_ofs = member_data_offsets(path)["flip/data.pkl"]
    raw[pkl_ofs + 40] ^= 0x01
    path.write_bytes(raw)
    refused(path)  # data.pkl is always CRC-checked


def test_fuzzed_files_load_or_are_refused(tmp_path):
    """Random byte mutations (data and pickle alike) either load or raise CheckpointError."""
    src = tmp_path / "seed.pth"
    torch.save(_samples()["views"] | _samples()["state_dict"], src)
    raw = src.read_bytes()
    pkl_ofs = member_data_offsets(src)["seed/data.pkl"]
    rng = np.random.default_rng(1)
    path = tmp_path / "fuzz.pth"
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(400):
        buf = bytearray(raw)
        lo, hi = (pkl_ofs, pkl_ofs + 700) if i % 2 else (0, len(raw))
        for pos in rng.integers(lo, hi, size=rng.integers(1, 4)):
            buf[pos] = rng.integers(0, 256)
        path.write_bytes(buf)
        try:
            read_pth(path, verify_crc=bool(i % 3))
            outcomes["loaded"] += 1
        except CheckpointError as exc:
            assert "fuzz.pth" in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0, outcomes


# ---- memory ------------------------------------------------------------------------------------


def rss_anon() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    pytest.skip("/proc/self/status has no RssAnon")


def test_zero_copy_read_and_write(tmp_path):
    """Reading 200 MB and touching every value, then re-writing it, adds ~no private memory."""
    path, copy = tmp_path / "big.pth", tmp_path / "copy.pth"
    n = 200 * 2**20 // 4
    arr = np.ones(n, np.float32)
    write_pth(path, {"a": arr[: n // 2].reshape(-1, 1024), "b": arr[n // 2 :]})
    del arr
    gc.collect()
    base = rss_anon()
    tensors = read_pth(path)
    assert sum(float(a.sum(dtype=np.float64)) for a in tensors.values()) == n
    grew_read = rss_anon() - base
    write_pth(copy, tensors)  # a memmapped source streams straight to disk
    grew_write = rss_anon() - base
    assert grew_read < 16 * 2**20 and grew_write < 16 * 2**20, (grew_read, grew_write)
    again = read_pth(copy, verify_crc=True)
    assert all(np.array_equal(again[k], tensors[k]) for k in tensors)


def test_module_does_not_import_torch():
    import ast

    for mod in (torchzip, torchzip_write):
        tree = ast.parse(open(mod.__file__).read())
        names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names} | {
            n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
        }
        assert not any(str(x).startswith("torch") for x in names), mod.__name__
