"""A 16,384-token prompt through a cpu-fp32 artifact in bounded memory; last logits vs reference.

    python benchmarks/long_prompt.py ARTIFACT [--tokens 16384] [--chunk 1024] [--out reports/long-prompt.md]

The runtime feeds the prompt in chunks carrying the state, so memory does not grow with T. The
numpy reference (fp32 and fp64) runs the same tokens; we compare the last position's logits and
the final WKV states.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from rwkv_opt.bench.metrics import compare_logits, rel_err
from rwkv_opt.checkpoint import load_source
from rwkv_opt.reference import ReferenceModel
from rwkv_opt.runtime import Session


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    man = json.loads((a.artifact / "manifest.json").read_text())
    cfg = man["source"]["config"]
    tokens = np.random.default_rng(0).integers(0, cfg["vocab"], (1, a.tokens))
    sess = Session(a.artifact, threads=a.threads, max_chunk=a.chunk)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    logits, st = sess.forward(tokens)
    dt = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del sess
    src = man["source"]["path"]
    preset = src.split(":")[1] if src.startswith("synthetic:") else None
    w = load_source(
        None if preset else src,
        preset=preset or "tiny",
        deepembed=cfg["variant"] == "rwkv7a",
        seed=int(src.rsplit("seed", 1)[1]) if preset else 0,
    )
    rows = []
    for dtype in (np.float32, np.float64):
        ref, rst = ReferenceModel(w, dtype).forward(tokens, full_output=False)
        m = compare_logits(ref[:, -1], logits[:, -1])
        wkv = np.stack([st[f"wkv_state_{i}"] for i in range(cfg["n_layer"])])
        rows.append((np.dtype(dtype).name, m["max_rel_err"], m["mean_kl"], m["top1"], rel_err(rst.wkv, wkv)))
        del ref, rst
    text = (
        "\n".join(
            [
                f"### {a.tokens:,}-token prompt, {man['target']} artifact "
                f"({cfg['n_layer']} layers, C={cfg['n_embd']}), "
                f"fed in chunks of {a.chunk}, {a.threads} threads",
                "",
                f"- command: `python benchmarks/long_prompt.py {a.artifact} --tokens {a.tokens} --chunk {a.chunk}`",
                f"- prefill: {dt:.1f} s ({a.tokens / dt:.0f} tok/s); peak RSS after session load {rss0:.0f} MiB, "
                f"after the whole prompt {rss1:.0f} MiB (growth {rss1 - rss0:.0f} MiB)",
                "",
                "| reference dtype | last logits max\\|err\\|/std | KL | top-1 | final WKV state max\\|err\\|/std |",
                "|---|---|---|---|---|",
            ]
            + [f"| {d} | {e:.2e} | {k:.2e} | {t:.0%} | {s:.2e} |" for d, e, k, t, s in rows]
        )
        + "\n"
    )
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
