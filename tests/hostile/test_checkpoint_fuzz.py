"""A seeded mutation fuzzer over the .pth reader: only the project's own error may escape (issue 14).

2,000 mutants of a small valid RWKV-7 checkpoint (one layer, C=8, written by ``write_pth`` with
torch's layout: aligned members, data descriptors, zip64 records) go through ``load_weights``: zip
and pickle structure, bounds, shapes, sizes, CRC and NaN checks. Each mutant either loads or raises
``RwkvOptError`` with one line; any other exception fails the test with the mutant's seed, which
``mutant(seed)`` rebuilds exactly. The operators:

  * file bytes: random byte flips, truncations, inserted bytes;
  * zip fields: sizes, CRCs, name/extra lengths and offsets in local headers, data descriptors, the
    central directory and the (zip64) end records;
  * data.pkl, repacked with correct CRCs so the change reaches the unpickler: opcode replacements,
    insertions, deletions, duplications, and edits of integer and length arguments. The base pickle
    uses the memo the way torch's does (BINPUT/BINGET of repeated globals), so memo opcodes are in play.
"""

from __future__ import annotations

import pickletools
import random
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from cli_run import MAX_BYTES, MAX_SECONDS
from corpus import MICRO, Member, zip_bytes

from rwkv_opt.checkpoint.synth import SyntheticStateDict
from rwkv_opt.checkpoint.torchzip import write_pth
from rwkv_opt.checkpoint.weights import load_weights
from rwkv_opt.errors import RwkvOptError

N_MUTANTS = 2000
BASE_SEED = 14_000
_GLOBALS = [b"ctorch._utils\n_rebuild_tensor_v2\n", b"ccollections\nOrderedDict\n", b"ctorch\nFloatStorage\n"]
_CODES = [op.code.encode("latin-1") for op in pickletools.opcodes]
_SIGNATURES = {  # zip record signature -> offsets of its size/offset/length fields (and their widths)
    b"PK\x03\x04": [(14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
    b"PK\x01\x02": [(16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (42, 4)],
    b"PK\x07\x08": [(4, 4), (8, 4), (12, 4)],
    b"PK\x06\x06": [(24, 8), (32, 8), (40, 8), (48, 8)],
    b"PK\x06\x07": [(8, 8)],
    b"PK\x05\x06": [(8, 2), (10, 2), (12, 4), (16, 4)],
}


def _memoized(pkl: bytes) -> bytes:
    """Give each repeated global one memo slot, as torch's pickler does: BINPUT at first use, BINGET after."""
    for slot, glob in enumerate(_GLOBALS):
        first = pkl.index(glob) + len(glob)
        put, get = b"q" + bytes([slot]), b"h" + bytes([slot])
        pkl = pkl[:first] + put + pkl[first:].replace(glob, get)
    return pkl


class Base:
    """The valid file and its parts, built once."""

    def __init__(self, folder: Path):
        cfg = replace(MICRO, n_layer=1)
        sd = SyntheticStateDict(cfg, seed=1, dtype="fp32").materialize()
        path = folder / "base.pth"
        write_pth(path, sd)
        self.file = path.read_bytes()
        with zipfile.ZipFile(path) as zf:
            self.members = [(i.filename, zf.read(i)) for i in zf.infolist()]
        pkl_name = next(n for n, _ in self.members if n.endswith("/data.pkl"))
        self.pkl_name = pkl_name
        self.pkl = _memoized(dict(self.members)[pkl_name])
        self.ops = [(pos, op) for op, _, pos in pickletools.genops(self.pkl)]
        self.fields = [
            (at + off, width)
            for sig, offs in _SIGNATURES.items()
            for at in _find_all(self.file, sig)
            for off, width in offs
        ]

    def repack(self, pkl: bytes) -> bytes:
        return zip_bytes([Member(n, pkl if n == self.pkl_name else d) for n, d in self.members])


def _find_all(data: bytes, sub: bytes) -> list[int]:
    out, at = [], data.find(sub)
    while at >= 0:
        out.append(at)
        at = data.find(sub, at + 1)
    return out


def _flip_bytes(base: Base, rng: random.Random) -> bytes:
    buf = bytearray(base.file)
    for _ in range(rng.randint(1, 4)):
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _truncate(base: Base, rng: random.Random) -> bytes:
    return base.file[: rng.randrange(len(base.file))]


def _insert_bytes(base: Base, rng: random.Random) -> bytes:
    at = rng.randrange(len(base.file))
    return base.file[:at] + rng.randbytes(rng.randint(1, 64)) + base.file[at:]


def _edit_field(base: Base, rng: random.Random) -> bytes:
    at, width = rng.choice(base.fields)
    old = int.from_bytes(base.file[at : at + width], "little")
    top = (1 << (8 * width)) - 1
    new = rng.choice([old + 1, old - 1, old + 64, old - 64, old * 2, 0, top, rng.randrange(top + 1)]) & top
    return base.file[:at] + new.to_bytes(width, "little") + base.file[at + width :]


def _edit_opcode(base: Base, rng: random.Random) -> bytes:
    """Replace, insert, delete or duplicate one opcode of data.pkl."""
    i = rng.randrange(len(base.ops) - 1)
    pos, end = base.ops[i][0], base.ops[i + 1][0]
    pkl, kind = base.pkl, rng.randrange(4)
    if kind == 0:
        pkl = pkl[:pos] + rng.choice(_CODES) + pkl[pos + 1 :]
    elif kind == 1:
        pkl = pkl[:pos] + rng.choice(_CODES) + rng.randbytes(rng.choice([0, 1, 2, 4, 8])) + pkl[pos:]
    elif kind == 2:
        pkl = pkl[:pos] + pkl[end:]
    else:
        pkl = pkl[:end] + pkl[pos:end] * rng.randint(1, 3) + pkl[end:]
    return base.repack(pkl)


_WIDTH = {1: 1, 2: 2, 4: 4, 8: 8, pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4U: 4}


def _edit_argument(base: Base, rng: random.Random) -> bytes:
    """Give one opcode with an argument (an int, a memo index, a length) another value."""
    pos, op = rng.choice([(p, op) for p, op in base.ops if op.arg is not None and op.arg.n in _WIDTH])
    width = _WIDTH[op.arg.n]
    value = rng.choice([0, 1, 2 ** (8 * width - 1) - 1, 2 ** (8 * width) - 1, rng.randrange(2 ** (8 * width))])
    start = pos + 1
    return base.repack(base.pkl[:start] + value.to_bytes(width, "little") + base.pkl[start + width :])


_OPERATORS = [
    (_flip_bytes, 4),
    (_truncate, 1),
    (_insert_bytes, 1),
    (_edit_field, 3),
    (_edit_opcode, 6),
    (_edit_argument, 5),
]  # (operator, weight): most mutants reach the pickle with valid CRCs


def mutant(base: Base, seed: int) -> bytes:
    rng = random.Random(seed)
    ops, weights = zip(*_OPERATORS)
    return rng.choices(ops, weights)[0](base, rng)


def _peak_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def test_fuzzed_checkpoints_load_or_refuse_in_one_sentence(tmp_path):
    base = Base(tmp_path)
    assert load_weights(tmp_path / "base.pth").config.n_layer == 1  # the base itself is valid
    path = tmp_path / "mutant.pth"
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    start_kb = _peak_kb()
    outcomes: dict[str, int] = {}
    slowest = 0.0
    for seed in range(BASE_SEED, BASE_SEED + N_MUTANTS):
        path.write_bytes(mutant(base, seed))
        start = time.monotonic()
        try:
            load_weights(path, digest=False)
            kind = "loaded"
        except RwkvOptError as exc:
            msg = str(exc)
            assert "\n" not in msg and len(msg) < 500, f"seed {seed}: {msg[:1000]!r}"
            kind = msg.replace(str(path), "").split("(")[0].split("'")[0].strip()[:60]
        except Exception as exc:  # the one thing this test exists to catch
            pytest.fail(f"seed {seed}: {type(exc).__name__} escaped: {exc!s:.500}")
        seconds = time.monotonic() - start
        assert seconds < MAX_SECONDS, f"seed {seed} took {seconds:.1f} s"
        slowest = max(slowest, seconds)
        outcomes[kind] = outcomes.get(kind, 0) + 1
    grew = (_peak_kb() - start_kb) * 1024
    assert grew < MAX_BYTES, grew
    # The mutants reach many different checks, not one early gate (zip, pickle, bounds, shapes, CRC).
    assert len(outcomes) >= 25 and outcomes.get("loaded", 0) < N_MUTANTS // 2, outcomes
    print(f"{N_MUTANTS} mutants: {len(outcomes)} outcomes, slowest {slowest:.3f} s, peak +{grew >> 20} MiB")


def test_mutants_are_reproducible(tmp_path):
    base = Base(tmp_path)
    assert mutant(base, BASE_SEED + 7) == mutant(base, BASE_SEED + 7)
