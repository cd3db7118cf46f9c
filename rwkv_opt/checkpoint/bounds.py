"""Bounds a checkpoint reader checks before it trusts, allocates or prints anything from the file.

A checkpoint is attacker-controlled input (issue 14): a few hundred bytes can declare a 1 TiB
tensor, a key of a million characters, a member that inflates to gigabytes, or a structure whose
repr() takes exponential time. Every reader (``torchzip`` for .pth, the safetensors reader) uses
the same helpers here, so one refusal reads the same whatever the format:

  * ``excerpt``: the only way a file-controlled string (key, member name, record) enters a message:
    clipped to a few dozen characters and escaped, so a message stays one short line;
  * ``element_count``: a shape is a short tuple of non-negative ints (rank <= MAX_RANK) whose
    product is exact; anything else is refused before numpy sees it;
  * ``check_sizes``: the tensors, in their own dtypes, fit in the file that holds them: no single
    tensor and no sum of tensors claims more bytes than the file has. Only a view that repeats data
    (stride 0, overlapping views, overlapping zip members) can break this, and a weights file never
    has one; it is what keeps every later float copy proportional to the file size;
  * ``require_finite``: no NaN or infinity in any float tensor, naming the first one that has one.

The helpers that refuse raise ``CheckpointError`` with one sentence that starts with ``source``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from rwkv_opt.errors import CheckpointError

MAX_RANK = 32  # torch and numpy allow 64; a weight has at most 3 (4 for a conv kernel)
MAX_ELEMENTS = 1 << 50  # per tensor: far above any real weight, far below numpy's intp overflow
_EXCERPT = 60
_FINITE_CHUNK = 1 << 20  # elements tested at a time: temporaries stay at a few MiB

# float dtype -> (unsigned view of the same width, exponent mask): all exponent bits set is inf/NaN.
_EXPONENT = {
    np.dtype("=f2"): (np.dtype("=u2"), 0x7C00),
    np.dtype(ml_dtypes.bfloat16): (np.dtype("=u2"), 0x7F80),
    np.dtype("=f4"): (np.dtype("=u4"), 0x7F800000),
    np.dtype("=f8"): (np.dtype("=u8"), 0x7FF0000000000000),
}


def excerpt(text, limit: int = _EXCERPT) -> str:
    """``repr`` of a str/bytes from the file, cut to ``limit`` characters (with the full length)."""
    if not isinstance(text, (str, bytes)):
        return f"a {type(text).__name__}"  # never repr() an attacker structure: it can be huge
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} {'characters' if isinstance(text, str) else 'bytes'})"


def element_count(shape) -> int | None:
    """prod(shape) when ``shape`` is a tuple or list of at most MAX_RANK ints in 0..MAX_ELEMENTS with a
    product <= MAX_ELEMENTS; else None. Bools are not ints here (JSON and pickle both have them)."""
    if not isinstance(shape, (tuple, list)) or len(shape) > MAX_RANK:
        return None
    if not all(type(n) is int and 0 <= n <= MAX_ELEMENTS for n in shape):
        return None
    total = math.prod(shape)
    return total if total <= MAX_ELEMENTS else None


def check_sizes(tensors: Mapping[str, np.ndarray], file_size: int, source: str) -> None:
    """Refuse tensors whose bytes, alone or together, exceed the ``file_size`` bytes that hold them."""
    total = 0
    for key, arr in tensors.items():
        nbytes = int(arr.size) * arr.dtype.itemsize
        if nbytes > file_size:
            raise CheckpointError(
                f"{source}: {excerpt(key)} declares shape {tuple(arr.shape)} ({nbytes:,} bytes of {arr.dtype}) "
                f"but the whole file has {file_size:,} bytes, so its data repeats itself (a stride-0 or "
                "overlapping view), which a weights file never has; re-save it from the original model"
            )
        total += nbytes
    if total > file_size:
        raise CheckpointError(
            f"{source}: its tensors declare {total:,} bytes in all but the file has {file_size:,}, so some "
            "of them share their data (overlapping views or zip members), which a weights file never has; "
            "re-save it from the original model"
        )


def _exponent(dtype: np.dtype):
    """(unsigned view dtype, exponent mask) for a float dtype of either byte order; None otherwise."""
    return _EXPONENT.get(dtype if dtype.isnative else dtype.newbyteorder("="))


def _first_non_finite(arr: np.ndarray, uint: np.dtype, mask: int) -> int | None:
    """Flat index of the first inf/NaN in a float array (None if all finite), chunk by chunk."""
    flat = arr.reshape(-1)  # a view for the contiguous arrays readers return (a copy otherwise)
    if not arr.dtype.isnative:
        flat = flat.byteswap()
    for start in range(0, flat.size, _FINITE_CHUNK):
        bits = flat[start : start + _FINITE_CHUNK].view(uint)
        bad = np.flatnonzero((bits & mask) == mask)
        if bad.size:
            return start + int(bad[0])
    return None


def require_finite(tensors: Mapping[str, np.ndarray], source: str, release=None) -> None:
    """Refuse the first float tensor holding a NaN or an infinity, naming it and the element.

    ``release(arr)`` (optional) runs after each tensor: readers pass ``torchzip.release_pages`` so a
    memory-mapped checkpoint does not stay in the resident set once checked.
    """
    for key, arr in tensors.items():
        exponent = _exponent(arr.dtype)
        if exponent is None:
            continue
        at = _first_non_finite(arr, *exponent)
        value = None if at is None else float(arr.reshape(-1)[at])
        if release is not None:
            release(arr)
        if at is not None:
            raise CheckpointError(
                f"{source}: {excerpt(key)} holds {value} at flat index {at:,} of shape {tuple(arr.shape)}; "
                "a usable checkpoint has only finite weights, so re-download it or take an earlier one "
                "from before the training run diverged"
            )
