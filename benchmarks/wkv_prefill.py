"""Time the WKV alone at the 0.1B shape (H=12, N=64): per-token Scan vs the chunked form.

    python benchmarks/wkv_prefill.py [--threads 2] [--lengths 1 128 512] [--chunks 32 64] [--rounds 15]

Each graph takes r, k, v, kk, a, log w (B,T,H,N) and the state, computes w = Exp(log w) and
b = kk * a, and runs one WKV: the base graph's `wkv_scan`, the direct `wkv_step` (T == 1 only),
`wkv_chunked` fed log w, or "fused": the fuse_wkv pass applied to the Scan graph (If on T, with
the last --chunks value and the default min_chunked_len). ORT CPU,
ORT_ENABLE_ALL, intra_op threads as given, inter_op 1. Runs are interleaved across graphs, one
run each per round with a short rest, so a throttling host slows every graph alike; medians are
reported with the ratio to the Scan. Outputs are checked against the Scan before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort

from rwkv_opt.graph import blocks
from rwkv_opt.graph.builder import FLOAT, GraphBuilder
from rwkv_opt.graph.wkv_chunked import wkv_chunked, wkv_step
from rwkv_opt.passes import get_pass
from rwkv_opt.passes.fuse_wkv import FuseWkvConfig
from rwkv_opt.reference.model import W_SCALE

H, N = 12, 64


def build(kind: str, chunk: int = 64):
    """One WKV graph; w = Exp(log w) is computed in the graph, as in the model."""
    g = GraphBuilder("wkv")
    r, k, v, kk, a, lw = (g.input(n, FLOAT, ["B", "T", H, N]) for n in ("r", "k", "v", "kk", "a", "lw"))
    s0 = g.input("s0", FLOAT, ["B", H, N, N])
    w, b = g.Exp(lw), g.Mul(kk, a)
    with g.scope("wkv"):
        if kind in ("scan", "fused"):
            y, s = blocks.wkv_scan(g, H, N, r, w, k, v, kk, b, s0)
        elif kind == "step":
            y, s = wkv_step(g, H, N, r, w, k, v, kk, b, s0)
        else:
            y, s = wkv_chunked(g, H, N, r, None, k, v, kk, b, s0, chunk=chunk, logw=lw)
    g.output(y, "y", FLOAT, ["B", "T", H, N])
    g.output(s, "s", FLOAT, ["B", H, N, N])
    m = g.model()
    if kind == "fused":  # the fuse_wkv pass on the Scan graph: If on T -> step / Scan / chunked
        m = get_pass("fuse_wkv")(FuseWkvConfig(chunk=chunk)).run(m).model
    return m


def session(model, threads: int, spin: bool = True):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if not spin:  # idle pool threads sleep instead of spinning (fairer on an oversubscribed host)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def feeds(T: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    lw = (W_SCALE / (1 + np.exp(-f(1, T, H, N) - 1))).astype(np.float32)
    kk = f(1, T, H, N)
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    return dict(
        r=f(1, T, H, N),
        k=f(1, T, H, N) * 0.5,
        v=f(1, T, H, N),
        kk=kk,
        a=1 / (1 + np.exp(-f(1, T, H, N))),
        lw=lw,
        s0=f(1, H, N, N) * 0.3,
    )


def bench(T: int, graphs: dict, rounds: int, rest: float, clock) -> dict:
    x = feeds(T)
    ref = None
    for name, s in graphs.items():
        y = s.run(None, {i.name: x[i.name] for i in s.get_inputs()})[0]
        if ref is None:
            ref = y
        err = np.abs(y - ref).max() / ref.std()
        assert err < 1e-4, f"{name} disagrees with the Scan at T={T}: {err:.1e}"
        for _ in range(3):
            s.run(None, {i.name: x[i.name] for i in s.get_inputs()})
    times = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, s in graphs.items():
            feed = {i.name: x[i.name] for i in s.get_inputs()}
            t0 = clock()
            s.run(None, feed)
            times[name].append(clock() - t0)
            time.sleep(rest)
    return {name: (statistics.median(ts) * 1e3, min(ts) * 1e3) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1, 128, 512])
    ap.add_argument("--chunks", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--rest", type=float, default=0.05, help="seconds between runs")
    ap.add_argument("--no-spin", action="store_true", help="ORT pool threads sleep instead of spinning")
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: perf_counter; cpu: this process's CPU time (steadier on a shared host; "
        "use with --threads 1, since pool threads spin)",
    )
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(
        f"WKV only, H={H} N={N} B=1, ORT {ort.__version__} CPU, {args.threads} thread(s)"
        f"{' (no spinning)' if args.no_spin else ''}, {args.clock} clock, "
        f"median / min of {args.rounds} interleaved runs (ms), speed-up vs the Scan on medians"
    )
    for T in args.lengths:
        sess = lambda m: session(m, args.threads, not args.no_spin)  # noqa: E731
        graphs = {"scan": sess(build("scan"))}
        if T == 1:
            graphs["step"] = sess(build("step"))
        for L in args.chunks:
            graphs[f"chunk{L}"] = sess(build("chunk", L))
        graphs[f"fused{args.chunks[-1]}"] = sess(build("fused", args.chunks[-1]))
        ms = bench(T, graphs, args.rounds, args.rest, clock)
        cells = "  ".join(f"{n} {t:.3f}/{lo:.3f} ({ms['scan'][0] / t:4.2f}x)" for n, (t, lo) in ms.items())
        print(f"T={T:5d}  {cells}")


if __name__ == "__main__":
    main()
