"""Size, decode and prefill speed, and accuracy of the cpu-fp32 / cpu-int8 / cpu-int4 targets.

    python benchmarks/quant_speed.py [--preset 0.1b] [--threads 2] [--targets cpu-fp32 cpu-int8 cpu-int4 cuda-int4]
                                     [--rounds 15] [--decode-steps 16] [--prefill-len 512]
                                     [--prompt 64] [--decoded 192] [--out DIR] [--json FILE]
    python benchmarks/quant_speed.py --ablate '{"scheme": "nbits4"}' '{"scheme": "nbits4", "block_size": 32}' ...
    python benchmarks/quant_speed.py --checkpoint model.pth --text held-out.txt --no-speed

Artifacts are built with `run_pipeline` from the synthetic preset (verification off here: the
accuracy below is the longer protocol; a target that misses its budget is still measured, and
the table says so). Then, in one process:

accuracy  teacher forced vs the fp32 numpy reference: a `--prompt`-token prompt, then `--decoded`
          tokens fed one at a time carrying the state; every artifact steps in lockstep with one
          reference run (its logits are computed once); logits compared at the prompt's last
          position and at every decode step (top-1 agreement, mean KL(ref || model), max|err|/std).
speed     ORT CPU EP, ORT_ENABLE_ALL, intra-op threads = --threads, batch 1, a default Session (so cpu-int4
          runs its int8 twins, graph/int8_twins.py). Each round times every target in a fresh process of
          its own (benchmarks/decode_ab.py's --measure), in an order rotating per round: a prefill of
          --prefill-len tokens from the zero state (median of its repeats), then --decode-steps one-token
          steps through Session.stepper (their median). Several sessions in one process disturb each
          other on 2 cores (their thread pools spin): that cost cpu-int4 30% of its prefill here (1224 vs
          1752 tok/s), so the speed is never measured beside another session. Reported: the median over
          rounds; ratios vs cpu-fp32 are the median of the per-round paired ratios, so a busy host slows
          every target alike.
          CUDA targets are not timed here (the CPU EP would time fp16 through casts); their
          accuracy is measured on the CPU EP like the pipeline's own verification.
size      bytes of the artifact directory (model.onnx + model.onnx.data).
--checkpoint  a .pth instead of the synthetic preset (e.g. one trained by `rwkv-opt train`).
--text    the accuracy tokens: the first --prompt + --decoded World-tokenizer tokens of this file
          instead of fixed random tokens (a trained model is only confident on text like its data).
          The table adds the reference's median top-1 probability: how peaked the logits are, which
          is what top-1 agreement depends on (near-flat logits flip on any rounding).
--ablate  accuracy (same protocol) and size of quantize pass configs applied, one at a time, to the
          cpu-fp32 artifact: the algorithm and scheme comparisons in reports/quantization.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from rwkv_opt.artifact import artifact_size
from rwkv_opt.bench.accuracy import fixed_tokens
from rwkv_opt.bench.metrics import LogitStats, log_softmax
from rwkv_opt.checkpoint import load_source
from rwkv_opt.config import Provider
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.passes._quant_calib import text_tokens
from rwkv_opt.pipeline import run_pipeline
from rwkv_opt.reference import ReferenceModel
from rwkv_opt.runtime import Session
from rwkv_opt.targets import get_target

BASE = "cpu-fp32"


def build(targets: list[str], weights, out: Path) -> dict[str, dict]:
    manifests = {}
    for name in targets:
        path = out / name
        if not (path / "manifest.json").exists():
            run_pipeline(get_target(name), weights, path, do_verify=False, progress=lambda m: None)
        manifests[name] = json.loads((path / "manifest.json").read_text())
    return manifests


def reference_logits(weights, tokens: np.ndarray, prompt: int) -> list[np.ndarray]:
    """fp32 numpy reference logits (1, 1, V) at the prompt's last position and at each decode step."""
    ref = ReferenceModel(weights, np.float32)
    want, st = ref.forward(tokens[:, :prompt], full_output=False)
    out = [want[:, -1:]]
    for t in range(prompt, tokens.shape[1]):
        want, st = ref.forward(tokens[:, t : t + 1], st)
        out.append(want)
    return out


def ref_confidence(want: list[np.ndarray]) -> float:
    """Median over positions of the reference's top-1 probability."""
    return float(np.median([np.exp(log_softmax(np.asarray(w, np.float64))).max() for w in want]))


def accuracy(session: Session, tokens: np.ndarray, prompt: int, want: list[np.ndarray]) -> dict:
    """Teacher-forced logits of `session` on `tokens` vs the reference's (`reference_logits`)."""
    stats = LogitStats()
    got, st = session.forward(tokens[:, :prompt])
    stats.add(want[0], got[:, -1:].astype(np.float32))
    for i, t in enumerate(range(prompt, tokens.shape[1])):
        got, st = session.forward(tokens[:, t : t + 1], st)
        stats.add(want[i + 1], got.astype(np.float32))
    return {**stats.result(), "positions": stats.positions}


def ablation(
    configs: list[dict], fp32_artifact: Path, tokens: np.ndarray, prompt: int, want: list[np.ndarray]
) -> list[dict]:
    """Accuracy and size of quantize configs applied to the cpu-fp32 artifact, one at a time."""
    import tempfile

    import onnx

    from rwkv_opt.artifact import save_model
    from rwkv_opt.pipeline import run_passes

    base = onnx.load(str(fp32_artifact / "model.onnx"))
    rows = []
    for cfg in configs:
        t0 = time.perf_counter()
        model, _ = run_passes(base, [("quantize", cfg)], progress=lambda m: None)
        seconds = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            save_model(model, Path(d) / "model.onnx")
            del model
            size = artifact_size(Path(d))
            acc = accuracy(Session(Path(d) / "model.onnx", threads=2), tokens, prompt, want)
        rows.append({"config": cfg, "size": size, "quantize_s": seconds, **acc})
        print(
            f"{json.dumps(cfg)}: {size / 2**20:.1f} MiB, top-1 {acc['top1']:.4f}, KL {acc['mean_kl']:.3e}, "
            f"max|err|/std {acc['max_rel_err']:.2e} ({seconds:.0f}s)",
            flush=True,
        )
    return rows


def speed(arts: dict[str, Path], threads: int, rounds: int, steps: int, prefill_len: int) -> dict[str, dict]:
    """Prefill and decode of each artifact, each round every one in a fresh process (module docstring)."""
    import decode_ab  # beside this file

    names = list(arts)
    pre = {n: [] for n in names}
    step = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            cmd = ["--measure", str(arts[n]), "--threads", str(threads), "--decode", str(steps)]
            res = decode_ab.child(cmd + ["--prefill", str(prefill_len)])
            pre[n].append(prefill_len / res["prefill_tok_s"])
            step[n].append(res["decode_ms"] / 1e3)
            print(
                f"  round {r + 1}/{rounds} {n}: {res['prefill_tok_s']:.0f} tok/s, {res['decode_ms']:.2f} ms", flush=True
            )
    out = {}
    for n in names:
        out[n] = {
            "prefill_tok_s": prefill_len / statistics.median(pre[n]),
            "decode_ms": 1e3 * statistics.median(step[n]),
            "prefill_x": statistics.median(b / p for b, p in zip(pre[BASE], pre[n])) if BASE in pre else None,
            "decode_x": statistics.median(b / d for b, d in zip(step[BASE], step[n])) if BASE in step else None,
        }
    return out


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: dict[str, dict], base_size: int | None, prefill_len: int) -> str:
    cols = [
        "target",
        "size MiB",
        "size x",
        "decode ms/token",
        "decode x",
        f"prefill T={prefill_len} tok/s",
        "prefill x",
        "top-1",
        "mean KL",
        "max\\|err\\|/std",
        "budget (top-1, KL)",
        "within budget",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for n, r in rows.items():
        b = get_target(n).budget
        ok = r["top1"] >= b.min_top1 and r["mean_kl"] <= b.max_kl and r["max_rel_err"] <= b.max_rel_err
        cells = [
            n,
            f"{r['size'] / 2**20:.1f}",
            _fmt(r["size"] / base_size if base_size else None, ".3f"),
            _fmt(r["decode_ms"], ".2f"),
            _fmt(r["decode_x"], ".2f"),
            _fmt(r["prefill_tok_s"], ".0f"),
            _fmt(r["prefill_x"], ".2f"),
            f"{r['top1']:.4f}",
            f"{r['mean_kl']:.2e}",
            f"{r['max_rel_err']:.2e}",
            f">= {b.min_top1}, <= {b.max_kl}",
            "yes" if ok else "NO",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.1b")
    ap.add_argument("--checkpoint", type=Path, help="a .pth instead of the synthetic preset")
    ap.add_argument("--text", type=Path, help="accuracy tokens from this text file (World tokenizer)")
    ap.add_argument("--no-speed", action="store_true", help="accuracy and size only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--targets", nargs="+", default=[BASE, "cpu-int8", "cpu-int4", "cuda-int4"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decoded", type=int, default=192)
    ap.add_argument("--out", type=Path, default=Path("/tmp/rwkv-opt-quant-speed"))
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument(
        "--ablate",
        nargs="+",
        metavar="CONFIG_JSON",
        help="instead: accuracy and size of these quantize configs applied to the cpu-fp32 artifact",
    )
    a = ap.parse_args(argv)

    w = load_source(a.checkpoint, a.preset, False, a.seed)
    key = a.preset if a.checkpoint is None else f"{a.checkpoint.resolve().parent.name}-{a.checkpoint.stem}"
    out = a.out / key
    t0 = time.perf_counter()
    manifests = build([BASE] if a.ablate else a.targets, w, out)
    print(f"artifacts ready in {time.perf_counter() - t0:.0f}s under {out}", file=sys.stderr)
    tokens = (
        text_tokens(
            a.text, 1, a.prompt + a.decoded, w.config.vocab, what="--text", instead="drop --text (fixed random tokens)"
        )
        if a.text
        else fixed_tokens(w.config.vocab, 1, a.prompt + a.decoded, seed=0)
    )
    want = reference_logits(w, tokens, a.prompt)
    conf = ref_confidence(want)
    if a.ablate:
        rows = ablation([json.loads(c) for c in a.ablate], out / BASE, tokens, a.prompt, want)
        if a.json:
            a.json.write_text(json.dumps(rows, indent=1, default=str))
        return 0
    acc = {n: accuracy(Session(out / n, threads=a.threads), tokens, a.prompt, want) for n in a.targets}
    timed = {n: out / n for n in a.targets if get_target(n).provider is Provider.CPU and not a.no_speed}
    spd = speed(timed, a.threads, a.rounds, a.decode_steps, a.prefill_len) if timed else {}
    untimed = {"prefill_tok_s": None, "decode_ms": None, "prefill_x": None, "decode_x": None}
    rows = {
        n: {
            **acc[n],
            **spd.get(n, untimed),
            "size": artifact_size(out / n),
            "passes": [(p["name"], p["config"]) for p in manifests[n]["passes"]],
        }
        for n in a.targets
    }
    base_size = rows[BASE]["size"] if BASE in rows else None
    print(
        f"{a.checkpoint or 'preset ' + a.preset}, {a.threads} threads, prompt {a.prompt} + {a.decoded} "
        f"teacher-forced ({a.text or 'fixed random tokens'}; reference median top-1 probability {conf:.3f}), "
        f"{a.rounds} rounds x {a.decode_steps} decode steps, prefill T={a.prefill_len}\n"
    )
    print(table(rows, base_size, a.prefill_len))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RwkvOptError as e:
        sys.exit(f"quant_speed: {e}")
