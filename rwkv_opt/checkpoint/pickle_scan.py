"""A bounded dry run of a torch ``data.pkl`` before CPython's unpickler builds anything from it.

``torchzip``'s unpickler resolves only allow-listed names, so no code from a file runs. But the C
unpickler trusts the file's numbers and shapes: ``LONG_BINPUT 0xFFFFFFF0`` makes it grow its memo
array to 32 GiB, ten million opcodes take minutes, and shared references let a 209-byte pickle
describe a tuple of 2^30 leaves whose hash() or repr() never ends (issue 14). ``scan`` walks the
opcodes once, in linear time, with a model of the unpickler's stack that keeps, for each value, its
nesting depth and its *expanded size* (how many objects a walk of it visits, shared parts counted
each time), and refuses before anything is built:

  * an opcode outside the allow-list, by name (e.g. ``BINBYTES``);
  * more than ``max_ops`` opcodes, a memo index above ``max_memo``, a value nested deeper than
    ``max_depth`` or expanding to more than ``max_nodes`` objects;
  * a damaged stream: a truncated argument, a stack underflow, a missing MARK, a memo read before
    its write, a missing STOP.

The limits sit far above real checkpoints: torch 2.13's data.pkl for a 7.2B RWKV-7a state dict
(1,222 tensors) has 36,673 opcodes and memo slots up to 9,781, and nests 6 deep. At the opcode cap
the scan takes about a second.

Depth and size are exact for immutable values (tuples, strings, numbers, our markers), which are
the only ones that can be hashed or compared as dict keys. A list or dict grown after it was put in
a tuple leaves that tuple's size stale, but such a tuple is unhashable, and the reader never
repr()s a structure from the file (``bounds.excerpt``), so a stale size cannot be turned into work.
"""

from __future__ import annotations

import pickletools
from dataclasses import dataclass


@dataclass(frozen=True)
class PickleLimits:
    """What one data.pkl may use (see the module docstring for how far real files are from these)."""

    max_ops: int = 1 << 21
    max_memo: int = 1 << 20  # the C unpickler allocates 8 bytes per slot up to the largest index
    max_depth: int = 64  # tuple hashing recurses in C without a depth guard
    max_nodes: int = 1 << 22


class PickleRefused(Exception):
    """The scan's verdict; ``damaged`` tells a broken stream from a hostile or oversized one."""

    def __init__(self, problem: str, damaged: bool = False):
        super().__init__(problem)
        self.damaged = damaged


# Argument layouts: a fixed byte count, or how the length is given.
_LEN1, _LEN4, _LINES2 = -1, -4, -2
_ARG = {
    "uint1": 1,
    "int4": 4,
    "uint2": 2,
    "uint4": 4,
    "uint8": 8,
    "float8": 8,
    "long1": _LEN1,
    "string1": _LEN1,
    "unicodestring1": _LEN1,
    "unicodestring4": _LEN4,
    "stringnl_noescape_pair": _LINES2,
}
_LEAF = (1, 1)  # (depth, expanded size) of a string, number, global or storage reference
_PUSH_LEAF = frozenset(
    "BININT BININT1 BININT2 LONG1 BINFLOAT NONE NEWTRUE NEWFALSE BINUNICODE "
    "SHORT_BINUNICODE SHORT_BINSTRING GLOBAL EMPTY_TUPLE".split()
)
_POP_PUSH = {
    "TUPLE1": 1,
    "TUPLE2": 2,
    "TUPLE3": 3,
    "REDUCE": 2,
    "NEWOBJ": 2,
    "STACK_GLOBAL": 2,
    "BINPERSID": 1,
}  # pop n, push one new value made of them
_GROW = {"APPEND": 1, "SETITEM": 2, "BUILD": 1}  # pop n into the container below them


def _table(allowed: frozenset[str]) -> dict[int, tuple[str, int]]:
    """opcode byte -> (name, argument layout) for the allowed opcodes."""
    out = {}
    for op in pickletools.opcodes:
        if op.name in allowed:
            out[op.code.encode("latin-1")[0]] = (op.name, 0 if op.arg is None else _ARG[op.arg.name])
    return out


class _Scan:
    """The stack model; one instance per scan."""

    def __init__(self, limits: PickleLimits):
        self.limits = limits
        self.stack: list = []  # (depth, size) tuples for immutable values, [depth, size] lists for containers
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}

    def pop(self, n: int) -> list:
        fence = self.marks[-1] if self.marks else 0
        if len(self.stack) - fence < n:
            raise PickleRefused("pops more values than its stack holds", damaged=True)
        items = self.stack[len(self.stack) - n :]
        del self.stack[len(self.stack) - n :]
        return items

    def pop_mark(self) -> list:
        if not self.marks:
            raise PickleRefused("closes a MARK it never opened", damaged=True)
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def checked(self, depth: int, size: int) -> tuple[int, int]:
        if depth > self.limits.max_depth:
            raise PickleRefused(f"nests values more than {self.limits.max_depth} deep")
        if size > self.limits.max_nodes:
            raise PickleRefused(
                f"builds a value of more than {self.limits.max_nodes:,} objects (shared references repeated)"
            )
        return depth, size

    def make(self, items: list, mutable: bool):
        """Push a value made of ``items``: a tuple (immutable) or a container built by REDUCE/NEWOBJ."""
        depth, size = self.checked(1 + max((i[0] for i in items), default=0), 1 + sum(i[1] for i in items))
        self.stack.append([depth, size] if mutable else (depth, size))

    def grow(self, items: list) -> None:
        """APPEND(S)/SETITEM(S)/BUILD: ``items`` go into the container on top of the stack."""
        if not self.stack or len(self.stack) == (self.marks[-1] if self.marks else 0):
            raise PickleRefused("adds items with no container under them", damaged=True)
        top = self.stack[-1]
        if not isinstance(top, list):
            raise PickleRefused("adds items to a value that is not a container", damaged=True)
        top[0], top[1] = self.checked(
            max(top[0], 1 + max((i[0] for i in items), default=0)), top[1] + sum(i[1] for i in items)
        )

    def memo_index(self, index: int) -> int:
        if index > self.limits.max_memo:
            raise PickleRefused(f"uses memo slot {index:,}, above the {self.limits.max_memo:,} a checkpoint needs")
        return index

    def step(self, name: str, arg: int) -> None:
        """Apply one opcode (``arg``: its memo index, where it has one) to the model."""
        if name in _PUSH_LEAF:
            self.stack.append(_LEAF)
        elif name in _POP_PUSH:
            self.make(self.pop(_POP_PUSH[name]), mutable=name in ("REDUCE", "NEWOBJ"))
        elif name in _GROW:
            self.grow(self.pop(_GROW[name]))
        elif name in ("APPENDS", "SETITEMS"):
            self.grow(self.pop_mark())
        elif name == "MARK":
            self.marks.append(len(self.stack))
        elif name == "TUPLE":
            self.make(self.pop_mark(), mutable=False)
        elif name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET"):
            self.stack.append([1, 1])
        elif name in ("BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise PickleRefused(f"reads memo slot {arg} before writing it", damaged=True)
            self.stack.append(self.memo[arg])
        elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(self.memo) if name == "MEMOIZE" else arg
            self.memo[self.memo_index(index)] = self.pop(1)[0]
            self.stack.append(self.memo[index])
        # PROTO and FRAME change nothing on the stack.


def _argument(data: bytes, pos: int, layout: int) -> tuple[int, int]:
    """(unsigned value of a fixed-size argument, else 0; position after the argument)."""
    value = 0
    if layout > 0:
        end = pos + layout
        value = int.from_bytes(data[pos:end], "little")
    elif layout == _LINES2:  # GLOBAL: "module\nname\n"
        first = data.find(b"\n", pos)
        end = data.find(b"\n", first + 1) + 1 if first >= 0 else 0
        if end == 0:
            raise PickleRefused("has a GLOBAL name that never ends", damaged=True)
    elif layout == _LEN1:
        end = pos + 1 + data[pos] if pos < len(data) else pos + 1
    elif layout == _LEN4:
        end = pos + 4 + (int.from_bytes(data[pos : pos + 4], "little") if pos + 4 <= len(data) else 0)
    else:
        end = pos
    if end > len(data):
        raise PickleRefused("ends inside an opcode's argument", damaged=True)
    return value, end


def scan(data: bytes, allowed: frozenset[str], limits: PickleLimits = PickleLimits()) -> None:
    """Refuse ``data`` (see the module docstring) unless it is a bounded, well-formed pickle of the
    ``allowed`` opcodes ending in STOP. Linear in len(data); builds no object from it."""
    table = _table(allowed)
    model = _Scan(limits)
    pos = 0
    for _ in range(limits.max_ops):
        if pos >= len(data):
            raise PickleRefused("ends before its STOP opcode", damaged=True)
        code = data[pos]
        if code not in table:
            op = pickletools.code2op.get(chr(code))
            if op is None:
                raise PickleRefused(f"has byte 0x{code:02x} at offset {pos}, which is no pickle opcode", damaged=True)
            raise PickleRefused(f"uses pickle opcode {op.name}, which a weights file never needs")
        name, layout = table[code]
        arg, pos = _argument(data, pos + 1, layout)
        if name == "STOP":
            model.pop(1)
            return
        model.step(name, arg)
    raise PickleRefused(f"has more than {limits.max_ops:,} pickle opcodes")
