"""Cost of the in-graph sampling head per decode step at V = 65,536, vs the 0.1B decode step.

    python benchmarks/sampling_overhead.py [--preset 0.1b] [--threads 2] [--rounds 60] [--target cpu-fp32|base]

Sessions (ORT CPU, ORT_ENABLE_ALL, intra-op threads as given, inter-op 1, batch 1):
  decode               the model without a head: one token in, logits + state out
  decode+head/<set>    the same model with the sampling head, fed state, occurence, uniform, parameters
  head/<set>           the head alone on a stub (logits in): the head's own cost
Parameter sets: g1 (the defaults, top_p 0.5), official (top_p 0.85), no_filter (top_p 1, T 0.8).
The occurence carries 64 generated tokens, as mid-generation. Runs are interleaved (one run per
session per round, order rotating) so a busy host slows every session alike; the report gives
medians and the median per-round ratio to `decode` (paired), for wall time and for process CPU
time; on a shared host run with --no-spin (ORT workers sleep instead of spinning) so that CPU time
counts work only and stays meaningful when the wall clock is dominated by other processes.
Goal: decode+head <= 1.10 x decode.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from rwkv_opt.checkpoint.synth import synthetic_state_dict
from rwkv_opt.checkpoint.weights import from_state_dict
from rwkv_opt.graph.model import BuildOptions, LogitsMode, build_model
from rwkv_opt.passes.base import get_pass, load_builtin
from rwkv_opt.passes.sampling_head import SamplingHead, occurrence_to_onnx, sampling_feeds
from rwkv_opt.pipeline import run_passes
from rwkv_opt.reference.sampler import (
    OFFICIAL_PIPELINE_ARGS,
    Occurrence,
    SamplingParams,
    occurrence_exempt_mask,
    update_occurrence,
)
from rwkv_opt.targets import get_target

PARAM_SETS = {
    "g1": SamplingParams(),
    "official": OFFICIAL_PIPELINE_ARGS,
    "no_filter": SamplingParams(temperature=0.8, top_p=1.0),
}


def session(model: onnx.ModelProto, threads: int, spin: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # the head's overridable defaults each log a warning at load
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def logits_stub(V: int) -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("Identity", ["logits"], ["head"])],
        "stub",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, V])],
        [helper.make_tensor_value_info("head", TensorProto.FLOAT, ["batch", 1, V])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    m.metadata_props.add(key="rwkv_opt.vocab", value=str(V))
    return m


def build(preset: str, target: str) -> tuple[onnx.ModelProto, int]:
    weights = from_state_dict(synthetic_state_dict(preset).materialize())
    model = build_model(weights, BuildOptions(logits=LogitsMode.LAST))
    if target != "base":
        passes = list(get_target(target).passes)
        model, _ = run_passes(model, passes, progress=lambda m: print(m, flush=True))
    return model, weights.config.vocab


def time_interleaved(runs: dict, rounds: int) -> dict[str, np.ndarray]:
    """name -> (rounds, 2) [wall, process CPU] seconds (one run per session per round, order rotating)."""
    names = list(runs)
    for n in names:
        for _ in range(3):
            runs[n]()
    out = {n: np.zeros((rounds, 2)) for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            runs[n]()
            out[n][r] = time.perf_counter() - t0, time.process_time() - c0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.1b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--no-spin", action="store_true", help="ORT workers sleep instead of spinning (busy hosts)")
    ap.add_argument(
        "--target",
        default=None,
        help="passes before the head (default: cpu-fp32 when all its passes are registered, else the base graph)",
    )
    args = ap.parse_args()
    get_pass("sampling")
    target = args.target or (
        "cpu-fp32" if all(p in load_builtin() for p in get_target("cpu-fp32").pass_names) else "base"
    )

    t0 = time.perf_counter()
    plain, V = build(args.preset, target)
    with_head = onnx.ModelProto()
    with_head.CopyFrom(plain)
    with_head = SamplingHead()(with_head).model
    spin = not args.no_spin
    sessions = {
        "decode": session(plain, args.threads, spin),
        "decode+head": session(with_head, args.threads, spin),
        "head": session(SamplingHead()(logits_stub(V)).model, args.threads, spin),
    }
    print(f"built {args.preset} ({target}) + head in {time.perf_counter() - t0:.0f} s; V = {V}")

    sess = sessions["decode"]
    state = {
        i.name: np.zeros([1 if isinstance(d, str) else d for d in i.shape], np.float32)
        for i in sess.get_inputs()
        if i.name != "x"
    }
    x = np.array([[510]], np.int64)
    logits = sess.run(["head"], {"x": x, **state})[0]
    exempt = occurrence_exempt_mask(size=V)
    rng = np.random.default_rng(0)
    runs = {"decode": lambda: sess.run(None, {"x": x, **state})}
    for name, params in PARAM_SETS.items():
        occ = Occurrence.zeros(V)
        for t in rng.choice(np.argsort(logits[0, 0])[-200:], 64):
            update_occurrence(occ, int(t), params, exempt)
        extra = {"occurence": occurrence_to_onnx(occ, exempt)[None], "uniform": rng.random(1), **sampling_feeds(params)}
        runs[f"decode+head/{name}"] = lambda e=extra: sessions["decode+head"].run(None, {"x": x, **state, **e})
        runs[f"head/{name}"] = lambda e=extra: sessions["head"].run(None, {"logits": logits, **e})

    times = time_interleaved(runs, args.rounds)
    base = times["decode"]
    print(
        f"\n{args.preset} ({target}), V = {V}, threads = {args.threads}, spin = {spin}, "
        f"{args.rounds} interleaved rounds, batch 1"
    )
    print(
        f"  {'session':22s} {'wall median ms':>14s} {'paired x decode [IQR]':>24s} {'CPU median ms':>14s} "
        f"{'paired CPU x decode':>20s}"
    )
    for n, t in times.items():
        q1, q2, q3 = np.percentile(t[:, 0] / base[:, 0], [25, 50, 75])
        cpu = np.median(t[:, 1] / np.maximum(base[:, 1], 1e-9))
        print(
            f"  {n:22s} {np.median(t[:, 0]) * 1e3:14.3f}   x{q2:.3f} [{q1:.3f}-{q3:.3f}] "
            f"{np.median(t[:, 1]) * 1e3:14.3f}   x{cpu:.3f}"
        )
    for name in PARAM_SETS:
        rows = {k: times[f"{k}/{name}"] for k in ("decode+head", "head")}
        wall = np.median(rows["decode+head"][:, 0] / base[:, 0]) - 1
        cpu = np.median(rows["decode+head"][:, 1] / np.maximum(base[:, 1], 1e-9)) - 1
        alone = np.median(rows["head"][:, 0]) / np.median(base[:, 0])
        alone_cpu = np.median(rows["head"][:, 1]) / np.median(base[:, 1])
        print(
            f"  overhead {name:10s} in-model wall {wall:+.1%}, CPU {cpu:+.1%}; head alone {alone:.1%} wall, "
            f"{alone_cpu:.1%} CPU of the decode step"
        )


if __name__ == "__main__":
    main()
