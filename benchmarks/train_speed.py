"""Training speed and peak memory of the fused ONNX training step (forward + backward + AdamW).

    python benchmarks/train_speed.py                       # tiny and 0.1b, seq 64, batch 1, each in its own process
    python benchmarks/train_speed.py --preset 0.1b --steps 3 --one

Each shape runs in a fresh process so ru_maxrss is that shape's peak RSS. Synthetic weights,
random tokens, every position a target; the first step is a warm-up and is not timed.
Prints one JSON line per shape and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(a) -> dict:
    import numpy as np

    from rwkv_opt.checkpoint.synth import synthetic_state_dict
    from rwkv_opt.checkpoint.weights import from_state_dict
    from rwkv_opt.training.data import Batch
    from rwkv_opt.training.loop import TrainConfig, Trainer

    t0 = time.perf_counter()
    w = from_state_dict(synthetic_state_dict(a.preset, seed=0, dtype="fp32"))
    rss_weights = rss_mib()
    cfg = TrainConfig(batch=a.batch, seq=a.seq, trainable=a.trainable, lr=1e-4, threads=a.threads)
    tr = Trainer(w, cfg, lambda s: print(s, file=sys.stderr, flush=True))
    rss_built = rss_mib()
    rng = np.random.default_rng(0)
    batch = Batch(
        rng.integers(1, w.config.vocab, (a.batch, a.seq)),
        np.ones((a.batch, a.seq), np.int64),
        np.zeros((a.batch, a.seq), np.float32),
    )
    first = tr.step(batch)
    times, losses = [], [first.loss]
    for _ in range(a.steps):
        s = tr.step(batch)
        times.append(s.seconds)
        losses.append(s.loss)
    return {
        "preset": a.preset,
        "batch": a.batch,
        "seq": a.seq,
        "trainable": a.trainable,
        "params_trained": int(tr.n_trainable),
        "step_nodes": len(tr.step_graph.model.graph.node),
        "build_s": round(tr.build_seconds, 1),
        "session_s": round(tr.session_seconds, 1),
        "first_step_s": round(first.seconds, 2),
        "step_s_median": round(float(np.median(times)), 3),
        "steps_per_s": round(1 / float(np.median(times)), 3),
        "tokens_per_s": round(a.batch * a.seq / float(np.median(times)), 1),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "rss_weights_mib": round(rss_weights),
        "rss_after_build_mib": round(rss_built),
        "peak_rss_mib": round(rss_mib()),
        "wall_s": round(time.perf_counter() - t0, 1),
        "threads": a.threads or "default",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", help="tiny, 0.1b (repeatable; default both)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    ap.add_argument("--trainable", default="all")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--one", action="store_true", help="run a single preset in this process")
    a = ap.parse_args()
    presets = a.preset or ["tiny", "0.1b"]
    if a.one:
        a.preset = presets[0]
        print(json.dumps(one(a)), flush=True)
        return 0
    rows = []
    for p in presets:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            "--preset",
            p,
            "--seq",
            str(a.seq),
            "--batch",
            str(a.batch),
            "--steps",
            str(a.steps),
            "--trainable",
            a.trainable,
            "--threads",
            str(a.threads),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            rows.append({"preset": p, "error": f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"})
        else:
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    cols = (
        "shape",
        "trained params",
        "step nodes",
        "build s",
        "session s",
        "s/step",
        "steps/s",
        "tokens/s",
        "peak RSS MiB",
    )
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        if "error" in r:
            print(f"| {r['preset']} | {r['error']} |")
            continue
        cells = (
            f"{r['preset']} b{r['batch']} x {r['seq']}",
            f"{r['params_trained']:,}",
            f"{r['step_nodes']:,}",
            r["build_s"],
            r["session_s"],
            r["step_s_median"],
            r["steps_per_s"],
            r["tokens_per_s"],
            f"{r['peak_rss_mib']:,}",
        )
        print("| " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
