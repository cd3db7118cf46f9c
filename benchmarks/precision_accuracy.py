"""Accuracy of the fp32, fp16_mixed, fp16 and bf16 graphs on CPU against the fp32 numpy reference.

    python benchmarks/precision_accuracy.py [--preset 0.1b] [--prompt 64] [--decode 192] [--opt-level disable]
                                            [--passes "fp16_mixed,fp16_mixed[elementwise=fp32],fp16,bf16"]
                                            [--no-rounded] [--official "cpu fp16"] [--plot PNG]

Protocol: one prompt of `--prompt` tokens, then `--decode` tokens fed one at a time carrying the
state (teacher forced: the same random token stream for every model); logits are compared at
every position. Prints top-1 agreement, max|err| / std(ref) and mean KL(ref || model), plus the
WKV state drift at the end. ORT runs with its graph optimizations off by default, so the numbers
are those of our graph, not of ORT's rewrites; but ORT's CPU EP computes chains of fp16 nodes in
fp32 (it drops the Cast pairs between them), so its fp16 numbers are optimistic. Each low-precision
graph also runs in rwkv_opt's rounding evaluator (every op rounded to its dtype, fp32 accumulation
in MatMul and reductions, like a GPU EP; ~30 s per graph at 0.1B; --no-rounded skips it), the only
CPU run bf16 can have. `--official "cpu fp16"` adds BlinkDL's `rwkv` package at that strategy on
the same checkpoint and tokens (torch CPU, its own subprocess) as the peer row. A pass may carry
config: `fp16_mixed[elementwise=fp32]`. The goals for fp16_mixed (reports/precision-0.1b.md): top-1 100%,
max|err|/std <= 3e-3, mean KL <= 1e-4.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import onnxruntime as ort
from onnx import TensorProto

from rwkv_opt.bench.metrics import compare_logits, rel_err
from rwkv_opt.checkpoint.synth import synthetic_state_dict
from rwkv_opt.checkpoint.weights import from_state_dict
from rwkv_opt.graph import contract
from rwkv_opt.graph.model import build_model
from rwkv_opt.passes import get_pass
from rwkv_opt.runtime.evaluator import rounding_evaluator
from rwkv_opt.reference import ReferenceModel

FLOAT, FLOAT16, BFLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16

_NP = {FLOAT: np.float32, FLOAT16: np.float16, BFLOAT16: ml_dtypes.bfloat16}
_LEVEL = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def ort_step(model, opt_level: str):
    so = ort.SessionOptions()
    so.graph_optimization_level = _LEVEL[opt_level]
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feed: dict(zip(names, sess.run(None, feed)))


def rounded_step(model):
    ev = rounding_evaluator(model)
    names = [o.name for o in model.graph.output]
    return lambda feed: dict(zip(names, ev.run(names, feed)))


def teacher_forced(step, model, cfg, tokens: np.ndarray, prompt: int):
    """-> (logits (B, T, V) fp32, final WKV states (L, B, H, N, N))."""
    types = {i.name: _NP.get(i.type.tensor_type.elem_type) for i in model.graph.input}
    B = tokens.shape[0]
    state = {}
    for i in range(cfg.n_layer):
        a, s, f = contract.state_inputs(i)
        state[a] = np.zeros((B, 1, cfg.n_embd), types[a])
        state[s] = np.zeros((B, cfg.n_head, cfg.head_size, cfg.head_size), np.float32)
        state[f] = np.zeros((B, 1, cfg.n_embd), types[f])
    chunks = [tokens[:, :prompt]] + [tokens[:, t : t + 1] for t in range(prompt, tokens.shape[1])]
    logits = []
    for c in chunks:
        out = step({contract.TOKENS: c, **state})
        logits.append(out[contract.LOGITS].astype(np.float32))
        state = {
            i: out[o] for k in range(cfg.n_layer) for o, i in zip(contract.state_outputs(k), contract.state_inputs(k))
        }
    wkv = np.stack([state[contract.state_inputs(k)[1]] for k in range(cfg.n_layer)])
    return np.concatenate(logits, 1), wkv


OFFICIAL = r"""
import os, sys, numpy as np
os.environ["RWKV_V7_ON"] = "1"
import torch
torch.set_num_threads(2)
from rwkv.model import RWKV
ckpt, strategy, tokens_path, prompt, out = sys.argv[1:6]
tokens, prompt = np.load(tokens_path), int(prompt)
m = RWKV(model=ckpt[:-4], strategy=strategy)
rows = []
with torch.no_grad():
    for row in tokens.tolist():
        lo, st = m.forward(row[:prompt], None, full_output=True)
        outs = [lo.float().numpy()]
        for t in row[prompt:]:
            lo, st = m.forward([t], st)
            outs.append(lo.float().numpy()[None])
        rows.append(np.concatenate(outs))
np.save(out, np.stack(rows))
"""


def official_logits(state_dict, strategy: str, tokens: np.ndarray, prompt: int) -> np.ndarray:
    """The official package's logits at `strategy` on the same checkpoint and tokens (B, T, V)."""
    from rwkv_opt.checkpoint.torchzip import write_pth

    with tempfile.TemporaryDirectory() as d:
        ckpt, tok, out = Path(d) / "model.pth", Path(d) / "tokens.npy", Path(d) / "logits.npy"
        write_pth(ckpt, state_dict)
        np.save(tok, tokens)
        subprocess.run(
            [sys.executable, "-c", OFFICIAL, str(ckpt), strategy, str(tok), str(prompt), str(out)],
            check=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        return np.load(out)


def make_pass(spec: str):
    """'name' or 'name[key=value,...]' -> the pass instance."""
    m = re.fullmatch(r"([\w]+)(?:\[(.*)\])?", spec)
    if m is None:
        raise SystemExit(f"--passes entry {spec!r} is not NAME or NAME[key=value,...]")
    cls = get_pass(m.group(1))
    kw = dict(kv.split("=", 1) for kv in m.group(2).split(",")) if m.group(2) else {}
    return cls(cls.Config(**kw))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.1b")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--opt-level", choices=sorted(_LEVEL), default="disable")
    ap.add_argument(
        "--passes",
        default="fp16_mixed,fp16_mixed[elementwise=fp32],fp16,bf16",
        help="bf16 runs only in the rounding evaluator",
    )
    ap.add_argument(
        "--no-rounded", dest="rounded", action="store_false", help="skip the rounding-evaluator runs of the fp16 graphs"
    )
    ap.add_argument("--plot", type=Path, help="write a PNG of max|err|/std per position for every row")
    ap.add_argument(
        "--official",
        default=None,
        metavar="STRATEGY",
        help="also run the official rwkv package at this strategy, e.g. 'cpu fp16' (needs torch, rwkv)",
    )
    a = ap.parse_args()

    t0 = time.perf_counter()
    sd = synthetic_state_dict(a.preset).materialize()
    w = from_state_dict(sd)
    cfg = w.config
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, (a.batch, a.prompt + a.decode), dtype=np.int64)
    ref = ReferenceModel(w, dtype=np.float32)
    ref_logits, st = ref.forward(tokens[:, : a.prompt])
    parts = [ref_logits]
    for t in range(a.prompt, tokens.shape[1]):
        lg, st = ref.forward(tokens[:, t : t + 1], st)
        parts.append(lg)
    ref_logits, ref_wkv = np.concatenate(parts, 1), st.wkv
    del ref, parts
    print(
        f"{a.preset}: reference done in {time.perf_counter() - t0:.0f}s "
        f"({tokens.shape[1]} positions x batch {a.batch}, V={cfg.vocab})",
        flush=True,
    )

    rows = []
    if a.official:
        t1 = time.perf_counter()
        got = official_logits(sd, a.official, tokens, a.prompt)
        rows.append((f"official rwkv '{a.official}'", "torch CPU", score(ref_logits, got)))
        print(f"  official '{a.official}' done in {time.perf_counter() - t1:.0f}s", flush=True)
    del sd
    base = build_model(w)
    del w
    gc.collect()
    for name in ["fp32", *re.findall(r"\w+(?:\[[^\]]*\])?", a.passes)]:
        model = base if name == "fp32" else make_pass(name)(base).model
        runners = [("rounded", rounded_step)] if name == "bf16" else [("ORT CPU", lambda m: ort_step(m, a.opt_level))]
        if a.rounded and name not in ("bf16", "fp32"):
            runners.append(("rounded", rounded_step))
        for how, make in runners:
            t1 = time.perf_counter()
            got, wkv = teacher_forced(make(model), model, cfg, tokens, a.prompt)
            rows.append((name, how, score(ref_logits, got, rel_err(ref_wkv, wkv))))
            print(f"  {name} ({how}) done in {time.perf_counter() - t1:.0f}s", flush=True)
            del got
            gc.collect()
        del model

    print(
        f"\n{a.preset}, prompt {a.prompt} + {a.decode} teacher-forced decode tokens, batch {a.batch}, vs fp32 "
        f"numpy reference. ORT CPU: graph optimizations {a.opt_level}; rounded: onnx.reference rounding "
        "every op to its dtype, fp32 accumulation in MatMul/reductions/LayerNorm (GPU-like)\n"
    )
    print(
        "| graph | run | top-1 | max abs err / std(ref) | same, first position excluded | mean KL | WKV state drift |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, how, m in rows:
        print(
            f"| {name} | {how} | {m['top1'] * 100:.2f}% | {m['max_rel_err']:.2e} | {m['first_excluded']:.2e} | "
            f"{m['mean_kl']:.2e} | {m['state_drift']:.2e} |"
        )
    if a.plot:
        plot(rows, a.plot, a.prompt)
        print(f"\nplot: {a.plot}")


def score(ref_logits: np.ndarray, got: np.ndarray, state_drift: float = float("nan")) -> dict:
    """compare_logits, plus the figure without the first position, the WKV drift and max|err|/std per position."""
    m = compare_logits(ref_logits, got)
    m["state_drift"] = state_drift
    m["first_excluded"] = compare_logits(ref_logits[:, 1:], got[:, 1:])["max_rel_err"]
    err = np.abs(np.asarray(ref_logits, np.float64) - got).max(axis=(0, 2))
    m["per_position"] = err / np.asarray(ref_logits, np.float64).std()
    return m


def plot(rows: list, path: Path, prompt: int) -> None:
    """max|err|/std(ref) per position, one line per row (log scale), with the 3e-3 goal line
    (reports/precision-0.1b.md)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    for name, how, m in rows:
        if name == "fp32":
            continue
        ax.plot(m["per_position"], lw=1, label=f"{name} ({how})")
    ax.axhline(3e-3, color="k", ls="--", lw=0.8, label="goal 3e-3")
    ax.axvline(prompt - 0.5, color="grey", ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(f"position (0-{prompt - 1}: prompt in one call; then one token per call, state carried)")
    ax.set_ylabel("max |logit err| / std(ref logits)")
    ax.set_title("Low-precision graphs vs the fp32 reference, per position")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
