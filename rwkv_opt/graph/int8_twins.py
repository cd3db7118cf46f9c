"""int8 twins of a 4-bit artifact's block GEMMs: the graph `runtime.Session` runs for cpu-int4 on the CPU EP.

On ORT's CPU EP, MatMulNBits (4-bit, block 32, int8 compute) is slow for a prompt: at M = 512 rows,
768 x 3072, it took 10.1 ms where DynamicQuantizeMatMul over int8 weights took 2.5 (MLAS's u8s8 GEMM;
reports/decode.md, session 7). The artifact stays 4-bit on disk; when a Session loads it, every 4-bit
MatMulNBits of the blocks (r/k/v/o in cpu-int4; the head is left, a prompt sends it one row) is replaced
by a DynamicQuantizeMatMul over its twin: the 4-bit weight dequantized, (q - z) * s, then re-rounded
per column to symmetric int8 (int8_per_column, the cpu-int8 scheme), computed here one matrix at a
time in numpy and handed to ORT as external initializers (SessionOptions.add_external_initializers:
no copy in the serialized graph, which stays far below protobuf's 2 GiB at any size). The 4-bit
initializers they replace are dropped from the graph ORT loads.

Measured (Intel Xeon, 2 threads; reports/decode.md, session 8): prefill 1.35x / 1.43x (0.1B, T = 128 /
512) and 1.93x (1.5B, T = 128); decode unchanged within noise (0.1B 0.997x / 1.007x, 1.5B 75.5 vs 75.6 ms:
the int8 twins read twice the bytes of 4-bit, and DynamicQuantizeMatMul's M = 1 kernel is that much faster);
session memory about the same after load and +0.6 GiB at its peak at 1.5B (our arrays, ORT's copy of
them and its packing live together while the session is made). Not kept, for memory: an If(T == 1) keeping the
4-bit kernels for one-token calls (decode unchanged, but ORT releases no initializer read inside an
If until the whole session is made: 1.5B load peak 3.35 vs 1.37 GiB, +0.41 GiB after load), and the
same arithmetic folded into model.onnx for every consumer (ORT's constant folding holds every
intermediate of every chain until it ends: +1.2 GiB at 0.1B; it never folds DequantizeLinear).
On an AMD EPYC (session 9, 0.1B): prefill 1.61x at T = 128 (1.19x paired at T = 512 in a disturbed run,
1.2-1.3x in its quiet rounds), decode 1.025-1.055x slower (the larger twins read more bytes; the step's GEMMs
alone measured 5.7-6.5 ms on twins vs 5.8-6.2 ms on the 4-bit kernels); at 1.5B prefill T = 128 1.79x and
decode 1.15x slower (57.4 vs 50.0 ms, 5 fresh-process pairs: 14% more bytes per step, and the 4-bit M = 1 kernel
there already streams at the memory's pace). `--int8-twins off` in generate/chat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rwkv_opt.graph.contract import Scope
from rwkv_opt.onnx_util import attr, names_read
from rwkv_opt.passes._quant_core import MS_DOMAIN

PLACEHOLDER = "rwkv_opt_int8_twins (in memory, given to ORT by Session)"  # never opened
BLOCKS = "/" + Scope.BLOCK.split("{")[0]  # "/blocks.": node names inside a layer


def _targets(g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The 4-bit, float32-scaled MatMulNBits of the blocks (top level) whose weights are initializers of the
    shapes MatMulNBits defines (uint8 B (N, blocks, block/2), scales N * blocks, packed uint8 zero points);
    anything else (float zero points, g_idx, a bias, a graph of another producer's shapes) stays as it is."""
    inits = {t.name: t for t in g.initializer}
    return [n for n in g.node if _twinnable(n, inits)]


def _twinnable(n: onnx.NodeProto, inits: dict) -> bool:
    if n.op_type != "MatMulNBits" or n.domain != MS_DOMAIN or not n.name.startswith(BLOCKS):
        return False
    K, N, block = attr(n, "K"), attr(n, "N"), attr(n, "block_size")
    if attr(n, "bits") != 4 or not all(isinstance(v, int) and v > 0 for v in (K, N, block)) or block % 2:
        return False
    if any(n.input[4:]):  # g_idx, bias
        return False
    nb = -(-K // block)
    b, s = inits.get(n.input[1]), inits.get(n.input[2])
    z = inits.get(n.input[3]) if len(n.input) > 3 and n.input[3] else None
    if b is None or b.data_type != TensorProto.UINT8 or list(b.dims) != [N, nb, block // 2]:
        return False
    if s is None or s.data_type != TensorProto.FLOAT or int(np.prod(s.dims)) != N * nb:
        return False
    if len(n.input) > 3 and n.input[3]:
        return z is not None and z.data_type == TensorProto.UINT8 and int(np.prod(z.dims)) == N * ((nb + 1) // 2)
    return True


def applies(model: onnx.ModelProto) -> bool:
    """Whether `model` has block MatMulNBits that with_int8_twins would replace (a cheap look, no weights read)."""
    return bool(_targets(model.graph))


def _dequantized(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int, N: int, block: int):
    """(q - z) * s as one float32 buffer worked in place -> a (N, K) view of it (a padded last block's tail
    left out)."""
    nb = -(-K // block)
    codes = np.empty((N, nb, block), np.uint8)
    codes[..., 0::2] = q.reshape(N, nb, block // 2) & 15
    codes[..., 1::2] = q.reshape(N, nb, block // 2) >> 4
    if zero_points is None:
        z = np.full((N, nb), 8, np.float32)
    else:
        z = np.stack([zero_points & 15, zero_points >> 4], -1).reshape(N, -1)[:, :nb].astype(np.float32)
    w = codes.reshape(N, nb * block).astype(np.float32)
    w3 = w.reshape(N, nb, block)
    w3 -= z[..., None]
    w3 *= scales.reshape(N, nb, 1).astype(np.float32)
    return w[:, :K]


def dequantize_nbits4(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int, N: int, block: int):
    """MatMulNBits' 4-bit B (N, blocks, block/2) uint8, scales (N, blocks) or flat, packed zero points
    (N, ceil(blocks/2)) or flat, or None (symmetric: 8) -> the float32 weight (K, N) it multiplies by;
    blocks = ceil(K / block), a partial last block padded."""
    return np.ascontiguousarray(_dequantized(q, scales, zero_points, K, N, block).T)


def int8_twin(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int, N: int, block: int):
    """int8_per_column(dequantize_nbits4(...)), bit for bit, in ~1/4 of its time: the rounding runs in place
    on the dequantized buffer, and the transpose to (K, N) is done on int8 in row panels (numpy's strided
    int8 transpose of a 2048 x 2048 took 37 ms, by panels of 256 rows 5 ms)."""
    w = _dequantized(q, scales, zero_points, K, N, block)
    amax = np.maximum(w.max(1), -w.min(1))  # = max |w| exactly
    scale = np.where(amax == 0, 1.0, amax / 127.0).astype(np.float32)
    w /= scale[:, None]
    np.rint(w, out=w)
    np.clip(w, -127, 127, out=w)
    q8 = w.astype(np.int8)
    out = np.empty((K, N), np.int8)
    for i in range(0, N, 256):
        out[:, i : i + 256] = q8[i : i + 256].T
    return out, scale


def with_int8_twins(model: onnx.ModelProto, base_dir: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]] | None:
    """(graph, {initializer name: int8 (K, N) array}) for a model with 4-bit MatMulNBits in its blocks, else
    None. `model` is the structure (external weights stay in `base_dir`); the arrays are to be handed to ORT
    with SessionOptions.add_external_initializers and kept alive until the session is made."""
    targets = _targets(model.graph)
    if not targets:
        return None
    inits = {t.name: t for t in model.graph.initializer}
    read = lambda name: numpy_helper.to_array(inits[name], str(base_dir)) if name else None  # noqa: E731
    arrays: dict[str, np.ndarray] = {}
    new_inits: list[TensorProto] = []
    replace: dict[int, onnx.NodeProto] = {}  # by position: names need not be unique
    where = {id(n): i for i, n in enumerate(model.graph.node)}
    for n in targets:
        K, N, block = attr(n, "K"), attr(n, "N"), attr(n, "block_size")
        zp = n.input[3] if len(n.input) > 3 else ""
        q8, scale = int8_twin(read(n.input[1]), read(n.input[2]), read(zp), K, N, block)
        stem = f"{n.name}/int8_twin/{where[id(n)]}"
        arrays[f"{stem}/q8"] = q8
        new_inits += [_placeholder(f"{stem}/q8", q8), numpy_helper.from_array(scale, f"{stem}/scale")]
        ins = [n.input[0], f"{stem}/q8", f"{stem}/scale"]
        node = helper.make_node("DynamicQuantizeMatMul", ins, list(n.output), name=n.name, domain=MS_DOMAIN)
        replace[where[id(n)]] = node
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = [replace.get(i, n) for i, n in enumerate(g.node)]
    del g.node[:]
    g.node.extend(nodes)
    read_now = names_read(g)
    kept = [t for t in g.initializer if t.name in read_now]  # the 4-bit weights replaced go unread
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    return out, arrays


def _placeholder(name: str, a: np.ndarray) -> TensorProto:
    """An external-data initializer of `a`'s type and shape whose bytes ORT takes from the session options."""
    t = TensorProto()
    t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(a.dtype)
    t.dims.extend(a.shape)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", PLACEHOLDER), ("offset", "0"), ("length", str(a.nbytes))):
        t.external_data.add(key=k, value=v)
    return t
