"""Weight quantizers (numpy) and the ORT contrib nodes that carry their results.

Layout letters: K reduction (in) dim, N output dim, G = ceil(K / block) blocks along K.
Weights arrive in our graph's layout W_KN (y = x @ W, pre-transposed [in, out]).

    quantized block:  w ~ (q - z) * s      q, z integers in [0, 2^bits - 1], s float
                      one (s, z) per (block of `block` rows of K, output column n)

Algorithms (both produce the same (q, s, z) block format, so either feeds any node):
  rtn   round to nearest with min/max (asymmetric) or absmax (symmetric) block ranges;
  gptq  Frantar et al. 2022: rows of W (the K axis) are rounded one at a time and the rounding
        error is pushed onto the rows not yet rounded through the inverse Hessian of the layer's
        calibration inputs, H = X^T X; block ranges are taken when the block is reached.
  Not here: HQQ. Its gain is a fractional zero point; rounded to the integer zero points that
  MatMulNBits packs it reproduced RTN exactly on our models, and float zero points take a
  MatMulNBits path measured 30-150x slower on ORT's CPU EP (reports/quantization.md).

Nodes:
  MatMulNBits (com.microsoft)        B uint8 (N, G, block*bits/8), scales (N, G), zero points
                                     packed uint8 (N, ceil(G*bits/8)) or absent (symmetric:
                                     z = 2^(bits-1)); accuracy_level 4 = int8 activations.
  DynamicQuantizeMatMul (com.microsoft)  B int8 (K, N) per-column symmetric, b_scale (N,);
                                     the activation is quantized to uint8 per tensor at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from rwkv_opt.tensorstore import make_tensor

MS_DOMAIN = "com.microsoft"


@dataclass
class BlockQuant:
    """q (K_pad, N) codes, s (G, N) scales, z (G, N) integer zero points (None: symmetric midpoint)."""

    q: np.ndarray
    s: np.ndarray
    z: np.ndarray | None
    bits: int
    block: int
    k: int

    def dequantize(self) -> np.ndarray:
        """The float weight (K, N) this quantization stands for."""
        z = (1 << (self.bits - 1)) if self.z is None else np.repeat(self.z, self.block, 0)
        w = (self.q.astype(np.float32) - z) * np.repeat(self.s, self.block, 0)
        return w[: self.k]


def _blocks(w_KN: np.ndarray, block: int) -> np.ndarray:
    """(K, N) -> (G, block, N), zero-padded along K."""
    k, n = w_KN.shape
    g = -(-k // block)
    if g * block != k:
        w_KN = np.concatenate([w_KN, np.zeros((g * block - k, n), w_KN.dtype)], 0)
    return w_KN.reshape(g, block, n)


def block_params(w_GBN: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-block (scale, zero) from the block's range; w_GBN (..., block, N) -> (..., N) each."""
    qmax = (1 << bits) - 1
    if symmetric:
        # The signed extreme maps to code 0 (value -2^(bits-1)), so all 2^bits codes are usable.
        idx = np.abs(w_GBN).argmax(-2)
        ext = np.take_along_axis(w_GBN, idx[..., None, :], -2)[..., 0, :]
        s = ext / -(1 << (bits - 1))
        s = np.where(s == 0, 1.0, s).astype(np.float32)
        return s, None
    lo = np.minimum(w_GBN.min(-2), 0.0)
    hi = np.maximum(w_GBN.max(-2), 0.0)
    s = ((hi - lo) / qmax).astype(np.float32)
    s = np.where(s == 0, 1.0, s).astype(np.float32)
    z = np.clip(np.round(-lo / s), 0, qmax)
    return s, z.astype(np.float32)


def _codes(w: np.ndarray, s: np.ndarray, z: np.ndarray | None, bits: int) -> np.ndarray:
    zz = (1 << (bits - 1)) if z is None else z
    return np.clip(np.round(w / s + zz), 0, (1 << bits) - 1)


def rtn(w_KN: np.ndarray, bits: int, block: int, symmetric: bool) -> BlockQuant:
    w = _blocks(np.asarray(w_KN, np.float32), block)  # (G, block, N)
    s, z = block_params(w, bits, symmetric)  # (G, N)
    q = _codes(w, s[:, None], None if z is None else z[:, None], bits)
    return BlockQuant(q.reshape(-1, w.shape[-1]).astype(np.uint8), s, z, bits, block, w_KN.shape[0])


def gptq(
    w_KN: np.ndarray, h_KK: np.ndarray, bits: int, block: int, symmetric: bool, percdamp: float = 0.1, lazy: int = 128
) -> BlockQuant:
    """GPTQ with per-block ranges taken from the error-updated weights when each block starts.

    h_KK is X^T X of the layer's inputs (any positive scale). Rows are visited in order (no
    act-order, so blocks stay contiguous along K as MatMulNBits needs them).
    """
    k, n = w_KN.shape
    g = -(-k // block)
    W = np.zeros((g * block, n), np.float32)
    W[:k] = w_KN
    H = np.zeros((g * block, g * block), np.float32)  # float32 like the reference GPTQ: 2x faster LAPACK
    H[:k, :k] = h_KK
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H[np.diag_indices_from(H)] += percdamp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper Cholesky of H^-1
    Q = np.zeros_like(W, dtype=np.uint8)
    S = np.zeros((g, n), np.float32)
    Z = None if symmetric else np.zeros((g, n), np.float32)
    lazy = max(block, lazy - lazy % block)
    for i1 in range(0, W.shape[0], lazy):
        i2 = min(i1 + lazy, W.shape[0])
        E = np.zeros((i2 - i1, n), np.float32)
        for i in range(i1, i2):
            if i % block == 0:
                s, z = block_params(W[i : i + block], bits, symmetric)
                S[i // block] = s
                if Z is not None:
                    Z[i // block] = z
            b = i // block
            zz = None if Z is None else Z[b]
            q = _codes(W[i], S[b], zz, bits)
            Q[i] = q
            deq = (q - ((1 << (bits - 1)) if zz is None else zz)) * S[b]
            e = (W[i] - deq) / U[i, i]
            W[i + 1 : i2] -= np.outer(U[i, i + 1 : i2], e)
            E[i - i1] = e
        W[i2:] -= U[i1:i2, i2:].T @ E
    return BlockQuant(Q, S, Z, bits, block, k)


def int8_per_column(w_KN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column: (q int8 (K, N), scale (N,)), w ~ q * scale."""
    amax = np.abs(w_KN).max(0)
    s = np.where(amax == 0, 1.0, amax / 127.0).astype(np.float32)
    q = np.clip(np.round(w_KN / s), -127, 127).astype(np.int8)
    return q, s


# ---- packing and nodes ---------------------------------------------------------------------------


def pack_nbits(bq: BlockQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """-> (B uint8 (N, G, block*bits/8), scales (N, G), zero points uint8 (N, ceil(G*bits/8)) | None)."""
    g, n = bq.s.shape
    q = bq.q.reshape(g, bq.block, n).transpose(2, 0, 1)  # (N, G, block)
    if bq.bits == 4:
        b = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    else:
        b = q.astype(np.uint8)
    zp = None
    if bq.z is not None:
        z = bq.z.T.astype(np.uint8)  # (N, G)
        if bq.bits == 4:
            if g % 2:
                z = np.concatenate([z, np.zeros((n, 1), np.uint8)], 1)
            z = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
        zp = np.ascontiguousarray(z)
    return np.ascontiguousarray(b), np.ascontiguousarray(bq.s.T), zp


def matmul_nbits_node(
    name: str, x: str, y: str, weight: str, bq: BlockQuant, accuracy_level: int, scale_dtype=np.float32
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    b, s, zp = pack_nbits(bq)
    inits = [make_tensor(b, f"{weight}.q{bq.bits}"), make_tensor(s.astype(scale_dtype), f"{weight}.scales")]
    ins = [x, inits[0].name, inits[1].name]
    if zp is not None:
        inits.append(make_tensor(zp, f"{weight}.zero_points"))
        ins.append(inits[2].name)
    node = helper.make_node(
        "MatMulNBits",
        ins,
        [y],
        name=name,
        domain=MS_DOMAIN,
        K=bq.k,
        N=s.shape[0],
        bits=bq.bits,
        block_size=bq.block,
        accuracy_level=accuracy_level,
    )
    return node, inits


def dynamic_int8_node(
    name: str, x: str, y: str, weight: str, w_KN: np.ndarray
) -> tuple[onnx.NodeProto, list[onnx.TensorProto], np.ndarray]:
    """DynamicQuantizeMatMul over per-column int8 weights; also returns the dequantized weight."""
    q, s = int8_per_column(w_KN)
    inits = [make_tensor(q, f"{weight}.q8"), make_tensor(s, f"{weight}.scale")]
    node = helper.make_node(
        "DynamicQuantizeMatMul", [x, inits[0].name, inits[1].name], [y], name=name, domain=MS_DOMAIN
    )
    return node, inits, q.astype(np.float32) * s
