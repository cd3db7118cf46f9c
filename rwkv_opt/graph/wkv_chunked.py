"""The WKV recurrence without a per-token Scan: a direct single step (T == 1) and a chunked form.

Both have the contract of `blocks.wkv_scan`: inputs r, w, k, v, kk, b are (B,T,H,N) with
b = kk * a, the state S (B,H,N,N) is [value, key], and they return (y_BTHN, s_out):

    S_t = S_{t-1} diag(w_t) - (S_{t-1} kk_t^T) b_t + v_t^T k_t         (row vectors of length N)
    y_t = S_t r_t^T

The chunked form (docs/wkv-chunked.md, section 3) splits T into C chunks of L tokens. Inside a chunk,
with the log decay lw = log w and positions t = 1..L:

    G  = cumsum(lw)   Gx = G - lw   g = G_L   Ge = g - G (reverse exclusive cumsum)
    D  = G - G_{L/2}  (two half-chunk cumsums outward from the midpoint)   Dx = D - lw
    A_kk = tril<(KK e^Dx (K e^-D)^T)   A_kb = tril<(KK e^Dx (B e^-D)^T)
    A_rk = tril<=(R e^D (K e^-D)^T)    A_rb = tril<=(R e^D (B e^-D)^T)
    [W | U~] = (I + A_kb)^-1 [KK e^Gx | A_kk V]       exact block inverse by block doubling over the
                                                       whole L x L triangle
    Yq = R e^G - A_rb W      Yi = A_rk V - A_rb U~
    P  = diag(e^g) - W^T (B e^Ge)        E = V^T (K e^Ge) - U~^T (B e^Ge)
    per chunk c (the only sequential part, a Scan over C), carrying S^T so nothing transposes:
        y_c = Yq_c S^T + Yi_c ;   S^T <- P_c^T S^T + E_c^T       (i.e. S <- S P_c + E_c)
        with P^T S^T = e^g * S^T - (W^T B e^Ge)^T S^T, so diag(e^g) is never materialised

Every exponent is a partial sum over only the tokens it spans (docs/wkv-chunked.md section 5, trap 5), the decays are
split at the chunk midpoint so no factor exceeds e^(0.61 L / 2) (trap 2), the masks are Trilu (a
select, so the large masked triangle never meets a 0 * inf), and the inverse is exact block
elimination (as stable as forward substitution), never the nilpotent product (section 4 and trap 4). T is padded
in the graph to a multiple of L with no-op tokens (lw = 0, i.e. w = 1, and zeros), so any T >= 1
and any batch work.

Layout letters: B batch, T time, H heads, N head size, C chunks, L chunk length, Q blocks of the
inverse per chunk, K block size. Inside the chunked form every tensor is (B,H,C,L,N): from (B,T,H,N)
that is one single-axis transpose and a Concat of zeros, both fast copies in ORT; the Scan's inputs
are then moved to (C,B,H,..) (C moved outward, again a fast copy) and its per-chunk output is written
(B,L,H,N), so y only has C and B to swap. Measured on the 0.1B shape (2 threads, Intel Xeon) against
the (C,B,H,L,N) layout with Pad and 5-D transposes: 0.93-0.94x of the WKV's time at T = 512, outputs
bitwise equal; prefill of the whole model 1.02-1.04x faster (reports/decode.md, session 7).
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from rwkv_opt.graph.builder import FLOAT, GraphBuilder, Value

INV_BLOCK = 16  # chunks above this are multiples of it (the lengths measured; the inverse takes any even L)
MAX_CHUNK = 64  # beyond this the masked triangle of the A matrices can overflow fp32


def check_chunk(chunk: int) -> str | None:
    """Why `chunk` is not a usable chunk length, or None."""
    if not isinstance(chunk, int) or chunk < 2 or chunk % 2 or chunk > MAX_CHUNK:
        return f"chunk must be an even int in [2, {MAX_CHUNK}], got {chunk!r}"
    if chunk > INV_BLOCK and chunk % INV_BLOCK:
        return f"chunk above {INV_BLOCK} must be a multiple of {INV_BLOCK}, got {chunk}"
    return None


def wkv_step(g: GraphBuilder, H: int, N: int, r, w, k, v, kk, b, s0_BHNN) -> tuple[Value, Value]:
    """One token (T == 1 exactly) with no Scan: the recurrence above applied once.

        u = S kk^T;  S' = S diag(w) + [-u | v^T] [b ; k];  y = S' r^T
    The two rank-1 updates are one (N x 2)(2 x N) MatMul, so the (B,H,N,N) state is swept by two
    elementwise ops instead of five. Measured on the 0.1B cpu-fp32 decode step (2 threads, 24 rounds,
    order alternating): 14.25 vs 14.94 ms.
    """
    col = lambda t: g.Reshape(t, g.ints(-1, H, N, 1))  # noqa: E731  (B,H,N,1)
    row = lambda t: g.Reshape(t, g.ints(-1, H, 1, N))  # noqa: E731  (B,H,1,N)
    u = g.MatMul(s0_BHNN, col(kk))  # (B,H,N,1)
    lhs = g.Concat(g.Neg(u), col(v), axis=-1)  # (B,H,N,2)
    rhs = g.Concat(row(b), row(k), axis=-2)  # (B,H,2,N)
    s1 = g.Add(g.Mul(s0_BHNN, row(w)), g.MatMul(lhs, rhs))
    y = g.Reshape(g.MatMul(s1, col(r)), g.ints(-1, 1, H, N))  # (B,1,H,N)
    return y, s1


def wkv_chunked(
    g: GraphBuilder, H: int, N: int, r, w, k, v, kk, b, s0_BHNN, chunk: int = 64, logw=None
) -> tuple[Value, Value]:
    """The chunked WKV for any T >= 1 (see the module docstring). Pass `logw` = log w (B,T,H,N)
    when the model has it (it does: -0.606531 * sigmoid(.)); then `w` is not used.
    """
    reason = check_chunk(chunk)
    if reason:
        raise ValueError(reason)
    L = chunk
    with g.scope("pad"):
        T = g.Shape(r, start=1, end=2)  # (1,) int64
        pad = g.Mod(g.Sub(g.ints(L), g.Mod(T, g.ints(L))), g.ints(L))
        zeros = g.ConstantOfShape(g.Concat(g.Shape(r, start=0, end=1), g.ints(H), pad, g.ints(N), axis=0))
    lw = logw if logw is not None else g.Log(w)
    lw, r, k, v, kk, b = (_to_chunks(g, x, zeros, N, L) for x in (lw, r, k, v, kk, b))
    with g.scope("decay"):
        G, Gx, gL, Ge, D, Dx = _log_decay_sums(g, lw, L)
    with g.scope("intra"):
        Yq, Yi, eg, M, Et = _chunk_pieces(g, L, r, k, v, kk, b, G, Gx, gL, Ge, D, Dx)
    with g.scope("scan"):
        s_out, y = _chunk_scan(g, H, N, L, s0_BHNN, eg, M, Et, Yq, Yi)
    with g.scope("unpad"):
        y = g.Reshape(g.Transpose(y, perm=[1, 0, 2, 3, 4]), g.ints(0, -1, H, N))  # (C,B,L,H,N) -> (B,C*L,H,N)
        y = g.Slice(y, g.ints(0), T, g.ints(1))
    return y, s_out


def _to_chunks(g: GraphBuilder, x_BTHN, zeros_BHPN, N: int, L: int) -> Value:
    """(B,T,H,N) -> zero-padded (B,H,C,L,N). Zero is the no-op token for every input (lw = 0).
    Each step is one of ORT's fast copies: H moved past T is a single-axis transpose (5D [1,0,3,2,4]
    straight to (C,B,H,L,N) was 2.7x slower), and the padding is a Concat (Pad was 2.3x slower)."""
    x = g.Concat(g.Transpose(x_BTHN, perm=[0, 2, 1, 3]), zeros_BHPN, axis=2)  # (B,H,C*L,N)
    return g.Reshape(x, g.ints(0, 0, -1, L, N))


def _log_decay_sums(g: GraphBuilder, lw, L: int):
    """Prefix sums of the log decay along the chunk (axis 3), each as a direct partial sum.

    G = sum_{s<=t} lw_s,  Gx = G - lw,  gL = G_L,  Ge = sum_{s>t} lw_s,
    D = G - G_m (m = L/2): -sum_{t<s<=m} lw_s for t <= m, sum_{m<s<=t} lw_s for t > m.
    """
    ax, m = _scalar(g, 3), L // 2
    G = g.CumSum(lw, ax)
    Gx = g.Sub(G, lw)
    gL = g.Slice(G, g.ints(L - 1), g.ints(L), g.ints(3))  # (B,H,C,1,N)
    Ge = g.CumSum(lw, ax, reverse=1, exclusive=1)
    lo = g.Slice(lw, g.ints(0), g.ints(m), g.ints(3))
    hi = g.Slice(lw, g.ints(m), g.ints(L), g.ints(3))
    D = g.Concat(g.Neg(g.CumSum(lo, ax, reverse=1, exclusive=1)), g.CumSum(hi, ax), axis=3)
    return G, Gx, gL, Ge, D, g.Sub(D, lw)


def _scalar(g: GraphBuilder, v: int) -> Value:
    """A 0-D int64 (CumSum's axis, Trilu's k). A Constant node: g.const stores 0-D arrays as (1,)."""
    return g.Constant(value=numpy_helper.from_array(np.array(v, np.int64)))


def _tril(g: GraphBuilder, x, k: int) -> Value:
    """Lower triangle from diagonal k (Trilu selects, so inf/NaN above it cannot leak through)."""
    return g.Trilu(x, _scalar(g, k), upper=0)


def _t(g: GraphBuilder, x) -> Value:
    """Swap the last two axes (ORT folds this into FusedMatMul)."""
    return g.Transpose(x, perm=[0, 1, 2, 4, 3])


def _chunk_pieces(g: GraphBuilder, L: int, r, k, v, kk, b, G, Gx, gL, Ge, D, Dx):
    """Everything that does not depend on the incoming state, for all chunks at once: the output
    pieces Yq, Yi (B,H,C,L,N) and the transposed chunk transition P^T = diag(e^g) - M, E^T, as
    e^g (B,H,C,N,1), M = (B e^Ge)^T W and E^T (B,H,C,N,N); they act on the transposed state."""
    eD = g.Exp(D)  # e^D and 1/e^D <= e^(0.61 L/2): finite
    r_, kk_ = g.Mul(r, eD), g.Mul(kk, g.Exp(Dx))  # R e^D, KK e^Dx
    b_ = g.Div(b, eD)  # B e^-D
    kT, bT = _t(g, g.Div(k, eD)), _t(g, b_)  # (K e^-D)^T, (B e^-D)^T
    lower = lambda x, diag: _tril(g, x, 0 if diag else -1)  # noqa: E731
    A_kk, A_rk = lower(g.MatMul(kk_, kT), False), lower(g.MatMul(r_, kT), True)
    A_rb = lower(g.MatMul(r_, bT), True)
    with g.scope("inverse"):
        Tinv = _unit_lower_inverse(g, L, lower(g.MatMul(kk_, bT), False))  # (I + A_kb)^-1
        W, U = g.MatMul(Tinv, g.Mul(kk, g.Exp(Gx))), g.MatMul(Tinv, g.MatMul(A_kk, v))
    Yq = g.Sub(g.Mul(r, g.Exp(G)), g.MatMul(A_rb, W))
    Yi = g.Sub(g.MatMul(A_rk, v), g.MatMul(A_rb, U))
    eGe = g.Exp(Ge)
    beT = _t(g, g.Mul(b, eGe))  # (B e^Ge)^T
    Et = g.Sub(g.MatMul(_t(g, g.Mul(k, eGe)), v), g.MatMul(beT, U))
    return Yq, Yi, _t(g, g.Exp(gL)), g.MatMul(beT, W), Et


def _unit_lower_inverse(g: GraphBuilder, L: int, A) -> Value:
    """(I + A)^-1 for A strictly lower triangular (B,H,C,L,L), by block doubling: the lower-triangular
    2 x 2 block inverse applied to diagonal blocks of size 1, 2, 4, ... at once, each level one masked
    product (a partial last block, L not a power of two, is the same formula with a smaller block):
        T_1 = I,   T_2s = T_s - T_s (A o M_s) T_s
    where T_s is block-diagonal with the exact inverses of the s x s diagonal blocks and M_s keeps
    the lower-left s x s block of every 2s x 2s diagonal block. Each level is the exact block
    formula (no power series, unlike the nilpotent product, so it is as stable as forward
    substitution) in ceil(log2 L) levels of two small MatMuls, instead of L - 1 row steps. The masks
    multiply: A is already a Trilu select, every entry finite (module docstring).
    """
    i = np.arange(L)
    Tm, s = None, 1
    while s < L:
        mask = (
            (i[:, None] // (2 * s) == i[None, :] // (2 * s)) & (i[:, None] // s % 2 == 1) & (i[None, :] // s % 2 == 0)
        ).astype(np.float32)
        As = g.Mul(A, g.const(mask))
        Tm = (
            g.Sub(g.const(np.eye(L, dtype=np.float32)), As) if Tm is None else g.Sub(Tm, g.MatMul(Tm, g.MatMul(As, Tm)))
        )
        s *= 2
    return Tm


def _chunk_scan(g: GraphBuilder, H: int, N: int, L: int, s0_BHNN, eg, M, Et, Yq, Yi):
    """Scan over the chunk axis 0 carrying the transposed state S^T [key, value]:
    y_c = Yq_c S^T + Yi_c ;   S^T <- e^g_c * S^T - M_c S^T + E^T_c     -> (s_out (B,H,N,N), y (C,B,L,H,N))
    """
    body = GraphBuilder("wkv_chunk_step")
    prefix = g.path("body")
    inp = lambda n, rows, cols=N: body.input(f"{prefix}/{n}", FLOAT, ["B", H, rows, cols])  # noqa: E731
    St, egc, Mc, Etc = inp("St", N), inp("eg", N, 1), inp("M", N), inp("Et", N)
    Yqc, Yic = inp("Yq", L), inp("Yi", L)
    with body.scope(prefix[1:]):
        St1 = body.Add(body.Sub(body.Mul(egc, St), body.MatMul(Mc, St)), Etc)
        y = body.Transpose(body.Add(body.MatMul(Yqc, St), Yic), perm=[0, 2, 1, 3])  # (B,L,H,N)
    body.output(St1, f"{prefix}/St_out", FLOAT, ["B", H, N, N])
    body.output(y, f"{prefix}/y", FLOAT, ["B", L, H, N])
    swap = [0, 1, 3, 2]
    chunks_first = [g.Transpose(x, perm=[2, 0, 1, 3, 4]) for x in (eg, M, Et, Yq, Yi)]  # (B,H,C,..) -> (C,B,H,..)
    st_out, y = g.op(
        "Scan", g.Transpose(s0_BHNN, perm=swap), *chunks_first, outputs=2, body=body.graph(), num_scan_inputs=5
    )
    return g.Transpose(st_out, perm=swap), y
