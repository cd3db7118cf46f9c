"""Time the fusion rules on the 0.1B shape: base graph vs each fusion, decode and prefill.

    python benchmarks/fusion_speed.py [--preset 0.1b] [--threads 2] [--lengths 1 128] [--rounds 100]
                                      [--rounds-prefill 15] [--reps 3] [--variants lerp ...] [--no-spin]
                                      [--profile]

The base graph is built from synthetic weights (LogitsMode.LAST, what decode and prefill use), and
each variant applies its passes to it. ORT CPU, ORT_ENABLE_ALL, intra_op threads as given, inter_op 1,
batch 1, zero state. Every variant's outputs are checked against the base before timing. Runs are
interleaved (one run per variant per round, the order rotating each round) so that a busy or
throttling host slows every variant alike; each round keeps a variant's fastest of --reps runs.
Reported: the median wall time, the median of the per-round (paired) ratio to the base with its IQR,
and the median process CPU time. On a shared host, --no-spin makes CPU time a measure of work done
(spinning workers would bill their waits).
--profile instead compares ORT profiles: per op type, the sum of each node's median kernel time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import numpy as np
import onnxruntime as ort

from rwkv_opt.checkpoint.synth import synthetic_state_dict
from rwkv_opt.checkpoint.weights import from_state_dict
from rwkv_opt.graph.model import BuildOptions, LogitsMode, build_model
from rwkv_opt.passes.experimental.fuse_token_shift_lerp import Config as LerpConfig
from rwkv_opt.passes.experimental.fuse_token_shift_lerp import FuseTokenShiftLerp, Unstack
from rwkv_opt.passes.experimental.fuse_lora import Config as LoraConfig
from rwkv_opt.passes.experimental.fuse_lora import FuseLora

# variant name -> passes applied to the base graph, in order
VARIANTS = {
    "base": [],
    "lerp": [FuseTokenShiftLerp()],
    "lerp_split": [FuseTokenShiftLerp(LerpConfig(unstack=Unstack.SPLIT))],
    "lerp_rkv": [FuseTokenShiftLerp(LerpConfig(batch_projections=True))],
    "lora_concat": [FuseLora(LoraConfig(batch_stacked=False))],
    "lerp+lora": [FuseTokenShiftLerp(), FuseLora()],
    "lerp_rkv+lora": [FuseTokenShiftLerp(LerpConfig(batch_projections=True)), FuseLora()],
}


def session(model, threads: int, profile: str | None = None, spin: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile:
        so.enable_profiling, so.profile_file_prefix = True, profile
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def feed(sess: ort.InferenceSession, T: int, vocab: int) -> dict:
    rng = np.random.default_rng(T)
    out = {}
    for i in sess.get_inputs():
        if i.name == "x":
            out[i.name] = rng.integers(0, vocab, (1, T)).astype(np.int64)
        else:
            out[i.name] = np.zeros([1 if isinstance(d, str) else d for d in i.shape], np.float32)
    return out


def build_variants(preset: str, names: list[str]) -> tuple[dict, int]:
    weights = from_state_dict(synthetic_state_dict(preset).materialize())
    base = build_model(weights, BuildOptions(logits=LogitsMode.LAST))
    models = {}
    for name in names:
        m = base
        for p in VARIANTS[name]:
            m = p(m).model
        models[name] = m
    return models, weights.config.vocab


def time_interleaved(sessions: dict, feeds: dict, rounds: int, reps: int) -> dict[str, np.ndarray]:
    """name -> (rounds, 2) array of [wall, process CPU] seconds: each round's fastest of `reps` runs."""
    names = list(sessions)
    times = {n: np.zeros((rounds, 2)) for n in names}
    for n in names:  # warm-up
        for _ in range(2):
            sessions[n].run(None, feeds[n])
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            best = (np.inf, np.inf)
            for _ in range(reps):
                t0, c0 = time.perf_counter(), time.process_time()
                sessions[n].run(None, feeds[n])
                best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
            times[n][r] = best
    return times


def report(times: dict[str, np.ndarray]) -> None:
    """Medians, and the median of the per-round ratio to the base (paired, so a busy spell that
    slows one round slows both sides of its ratio)."""
    base = times["base"]
    print(
        f"  {'variant':14s} {'wall median ms':>14s} {'paired ratio [IQR]':>24s} "
        f"{'CPU median ms':>14s} {'CPU ratio':>10s}"
    )
    for n, t in times.items():
        ratio = t[:, 0] / base[:, 0]
        q1, q2, q3 = np.percentile(ratio, [25, 50, 75])
        cpu = np.median(t[:, 1])
        print(
            f"  {n:14s} {np.median(t[:, 0]) * 1e3:14.2f}   x{q2:.3f} [{q1:.3f}-{q3:.3f}]  {cpu * 1e3:14.2f}"
            f"     x{cpu / np.median(base[:, 1]):.3f}"
        )


def profile(model, threads: int, T: int, vocab: int, runs: int, spin: bool) -> dict[str, tuple[str, float]]:
    """ORT's profile of `runs` runs: node name -> (op type, median kernel µs).

    Per-node medians over many runs shrug off the preemptions that make whole-run times noisy on a
    shared host; the Scan body's nodes are listed in their own rows besides the Scan's own time.
    """
    with tempfile.TemporaryDirectory() as d:
        sess = session(model, threads, profile=os.path.join(d, "prof"), spin=spin)
        f = feed(sess, T, vocab)
        for _ in range(runs):
            sess.run(None, f)
        events = json.load(open(sess.end_profiling()))
    per_node, op_of = collections.defaultdict(list), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"][: -len("_kernel_time")]].append(e["dur"])
            op_of[e["name"][: -len("_kernel_time")]] = e["args"]["op_name"]
    return {n: (op_of[n], statistics.median(d)) for n, d in per_node.items()}


def report_profiles(profiles: dict[str, dict], T: int, top: int = 10) -> None:
    """Base's time per op type; per variant, the kernel time of the nodes it removed and added.

    Nodes whose names both graphs share are the control: their time ratio (drift) measures how much
    busier the host was during the variant's profile, and the added nodes' time is divided by it.
    """
    base = profiles["base"]
    by_op, count = collections.defaultdict(float), collections.Counter()
    for op, us in base.values():
        by_op[op] += us
        count[op] += 1
    total0 = sum(by_op.values())
    print(f"\nprofile T={T}: base, sum of per-node median kernel times {total0 / 1e3:.2f} ms, {len(base)} nodes")
    for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {op:20s} {us / 1e3:7.3f} ms  {100 * us / total0:5.1f}%  {count[op]:4d} nodes")
    print(f"  {'variant':14s} {'removed ms':>10s} {'added ms':>9s} {'net ms':>8s} {'drift':>6s}  added op types")
    for name, prof in profiles.items():
        if name == "base":
            continue
        common = set(prof) & set(base)
        drift = sum(prof[n][1] for n in common) / sum(base[n][1] for n in common)
        removed = sum(base[n][1] for n in set(base) - common)
        added = sum(prof[n][1] for n in set(prof) - common) / drift
        ops = collections.Counter(prof[n][0] for n in set(prof) - common)
        print(
            f"  {name:14s} {removed / 1e3:10.3f} {added / 1e3:9.3f} {(added - removed) / 1e3:+8.3f} {drift:6.3f}  "
            + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items()))
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.1b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--rounds", type=int, default=100, help="timed rounds at T=1 (decode)")
    ap.add_argument("--rounds-prefill", type=int, default=15, help="timed rounds at T>1")
    ap.add_argument("--reps", type=int, default=3, help="runs per variant per round; the fastest counts")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument(
        "--profile",
        action="store_true",
        help="compare ORT profiles (per-node median kernel times) instead of timing whole runs",
    )
    ap.add_argument("--profile-runs", type=int, default=40)
    ap.add_argument(
        "--no-spin",
        action="store_true",
        help="ORT worker threads sleep instead of spinning, so CPU time measures work (busy hosts)",
    )
    args = ap.parse_args()

    names = list(dict.fromkeys(["base", *args.variants]))
    t0 = time.perf_counter()
    models, vocab = build_variants(args.preset, names)
    print(f"built {', '.join(names)} in {time.perf_counter() - t0:.0f} s")
    if args.profile:
        for T in args.lengths:
            report_profiles(
                {n: profile(m, args.threads, T, vocab, args.profile_runs, not args.no_spin) for n, m in models.items()},
                T,
            )
        return
    sessions = {}
    for n in names:
        sessions[n] = session(models.pop(n), args.threads, spin=not args.no_spin)
    for T in args.lengths:
        feeds = {n: feed(s, T, vocab) for n, s in sessions.items()}
        ref = sessions["base"].run(None, feeds["base"])
        for n, s in sessions.items():
            err = max(float(np.abs(a - b).max()) for a, b in zip(ref, s.run(None, feeds[n])))
            assert err < 1e-3, f"{n} disagrees with base at T={T}: max|err| {err}"
        rounds = args.rounds if T == 1 else args.rounds_prefill
        print(
            f"\nT={T}  threads={args.threads}  rounds={rounds} x best of {args.reps}  spin={not args.no_spin}  "
            f"({args.preset}, batch 1, ORT_ENABLE_ALL)"
        )
        report(time_interleaved(sessions, feeds, rounds, args.reps))


if __name__ == "__main__":
    main()
