"""ONNX fp32 vs numpy reference vs BlinkDL's official `rwkv` package on a synthetic shape.

    python benchmarks/oracle_check.py --preset 0.1b [--deepembed] [--out reports/oracle-0.1b.md]

A 64-token prompt as one sequence, token by token, and in two chunks (split at 23), for batch 1
and batch 3 with different prompts (the official package runs each row on its own). Prints
max|err| / std(ref) for logits and WKV states, and whether argmax is identical everywhere.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rwkv_opt.checkpoint.synth import synthetic_state_dict  # noqa: E402
from rwkv_opt.checkpoint.torchzip import write_pth  # noqa: E402
from rwkv_opt.checkpoint.weights import load_weights  # noqa: E402
from rwkv_opt.graph.model import build_model  # noqa: E402
from rwkv_opt.reference import ReferenceModel  # noqa: E402
from rwkv_opt.runtime import Session  # noqa: E402
from rwkv_opt.artifact import save_model  # noqa: E402


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.std(b))


def onnx_modes(sess, tokens, split):
    seq, st = sess.forward(tokens)
    wkv = lambda s: np.stack([s[f"wkv_state_{i}"] for i in range(sess.config.n_layer)], 1)  # noqa: E731
    res = {"seq": (seq, wkv(st))}
    st, outs = None, []
    for t in range(tokens.shape[1]):
        lo, st = sess.forward(tokens[:, t : t + 1], st)
        outs.append(lo)
    res["tok"] = (np.concatenate(outs, 1), wkv(st))
    a, st = sess.forward(tokens[:, :split])
    b, st = sess.forward(tokens[:, split:], st)
    res["chunk"] = (np.concatenate([a, b], 1), wkv(st))
    return res


def ref_modes(ref, tokens, split):
    seq, st = ref.forward(tokens)
    res = {"seq": (seq, st.wkv.swapaxes(0, 1))}
    st, outs = None, []
    for t in range(tokens.shape[1]):
        lo, st = ref.forward(tokens[:, t : t + 1], st)
        outs.append(lo)
    res["tok"] = (np.concatenate(outs, 1), st.wkv.swapaxes(0, 1))
    a, st = ref.forward(tokens[:, :split])
    b, st = ref.forward(tokens[:, split:], st)
    res["chunk"] = (np.concatenate([a, b], 1), st.wkv.swapaxes(0, 1))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="0.1b")
    ap.add_argument("--deepembed", action="store_true")
    ap.add_argument("--ref-dtype", default="float64")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    split, rows = 23, []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        ckpt = d / "model.pth"
        write_pth(ckpt, synthetic_state_dict(a.preset, deepembed=a.deepembed, seed=1))
        w = load_weights(ckpt, digest=False)
        tokens = np.random.default_rng(0).integers(0, w.config.vocab, (3, 64))
        np.save(d / "tokens.npy", tokens)
        t0 = time.time()
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "tests" / "oracle_worker.py"),
                str(ckpt),
                str(d / "tokens.npy"),
                "1" if a.deepembed else "0",
                str(d / "off.npz"),
                str(split),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        off = np.load(d / "off.npz")
        print(f"official done in {time.time() - t0:.0f}s", file=sys.stderr)
        ref = ref_modes(ReferenceModel(w, np.dtype(a.ref_dtype)), tokens, split)
        gc.collect()  # one model in memory at a time: the 0.1B DeepEmbed tables are 3 GB per copy
        model = build_model(w)
        save_model(model, d / "model.onnx")
        del model, w
        gc.collect()
        ours = {}
        for batch in (1, 3):
            sess = Session(d / "model.onnx")
            ours[batch] = onnx_modes(sess, tokens[:batch], split)
        for mode in ("seq", "tok", "chunk"):
            o_lo = np.stack([off[f"{mode}_{b}"] for b in range(3)])
            o_wkv = np.stack([off[f"{mode}_wkv_{b}"] for b in range(3)])
            r_lo, r_wkv = ref[mode]
            rows.append(
                (
                    "official",
                    "reference",
                    mode,
                    3,
                    rel(o_lo, r_lo),
                    rel(o_wkv, r_wkv),
                    bool((o_lo.argmax(-1) == r_lo.argmax(-1)).all()),
                )
            )
            for batch in (1, 3):
                g_lo, g_wkv = ours[batch][mode]
                for against, lo, wkv in (("reference", r_lo, r_wkv), ("official", o_lo, o_wkv)):
                    lo, wkv = lo[:batch], wkv[:batch]
                    top1 = bool((g_lo.argmax(-1) == lo.argmax(-1)).all())
                    rows.append(("onnx fp32", against, mode, batch, rel(g_lo, lo), rel(g_wkv, wkv), top1))
    name = f"{a.preset}{' DeepEmbed (RWKV-7a)' if a.deepembed else ' (RWKV-7)'}"
    lines = [
        f"### {name}, 64-token prompts, split at {split}; reference in {a.ref_dtype}",
        "",
        "| model | against | mode | batch | logits max\\|err\\|/std | WKV state max\\|err\\|/std | argmax identical |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {vs} | {mode} | {b} | {e:.2e} | {s:.2e} | {am} |" for m, vs, mode, b, e, s, am in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n")
    worst = max(r[4] for r in rows)
    return 0 if worst <= 1e-4 and all(r[6] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
