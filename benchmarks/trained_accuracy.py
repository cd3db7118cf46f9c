"""Quantization accuracy on a 0.1B that has been trained (here, offline), not only initialised.

    python benchmarks/trained_accuracy.py [--work /tmp/rwkv-opt-trained] [--threads 2]

Why: the synthetic checkpoints follow the official initialisation, so their next-token
distributions are nearly flat (the reference's median top-1 probability is 0.027 at 0.1B), and
top-1 agreement then flips on any rounding: it measures how flat the logits are more than how good
the quantization is. A trained model is confident where the text is predictable. No trained
RWKV-7 checkpoint can be downloaded here, so this script trains one with rwkv-opt itself:

1. corpus: the docstrings (> 300 characters) of the Python standard library installed here,
   shuffled with a fixed seed; the docstrings of every 10th module (sorted by name) are held
   out -> train.jsonl (~465 kB of text here) and heldout.txt (~31 kB), never seen in training;
2. `rwkv-opt pipeline --target cpu-fp32 --head sft --preset 0.1b` (the synthetic 0.1B, seed 0);
3. `rwkv-opt train`, two stages: 700 AdamW steps on the last two blocks and the head (lr 1e-3,
   warm-up 30), then 1200 steps on every tensor (lr 6e-4, warm-up 20); batch 1 x 64 tokens
   (about 25 minutes on 2 cores, 9 GB peak for the second stage);
4. `benchmarks/quant_speed.py --checkpoint <trained> --text heldout.txt --no-speed`: every
   quantized target's teacher-forced accuracy on the held-out text (64 prompt + 192 tokens), and
   the same on fixed random tokens (`--random-too`) for comparison.

Each step is skipped when its output already exists under --work, so a rerun only re-measures.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import random
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}  # side effects / GUI


def stdlib_docstrings() -> list[tuple[str, str]]:
    """(module, docstring) for the standard library's modules, classes and functions."""
    stdlib = sysconfig.get_paths()["stdlib"]
    docs = []
    for m in sorted(pkgutil.iter_modules([stdlib]), key=lambda m: m.name):
        name = m.name
        if name.startswith("_") or name in SKIP:
            continue
        try:
            mod = importlib.import_module(name)
        except BaseException:  # noqa: BLE001  (some modules exit or need a display on import)
            continue
        if not (getattr(mod, "__file__", None) or "").startswith(stdlib):
            continue
        seen = set()
        members = [v for _, v in inspect.getmembers(mod) if inspect.isclass(v) or inspect.isfunction(v)]
        for obj in [mod, *members]:
            d = inspect.getdoc(obj)
            if d and len(d) > 300 and d not in seen:
                seen.add(d)
                docs.append((name, re.sub(r"\n{3,}", "\n\n", d)))
    return docs


def write_corpus(work: Path) -> tuple[Path, Path]:
    train, held = work / "train.jsonl", work / "heldout.txt"
    if train.exists() and held.exists():
        return train, held
    docs = stdlib_docstrings()
    random.Random(0).shuffle(docs)
    held_mods = set(sorted({n for n, _ in docs})[::10])
    rows = [d for n, d in docs if n not in held_mods]
    with open(train.with_suffix(".tmp"), "w") as f:
        for d in rows:
            f.write(json.dumps({"text": d}) + "\n")
    held.with_suffix(".tmp").write_text("\n\n".join(d for n, d in docs if n in held_mods))
    train.with_suffix(".tmp").rename(train)
    held.with_suffix(".tmp").rename(held)
    print(f"corpus: {len(rows)} training docstrings, held-out modules: {len(held_mods)}", flush=True)
    return train, held


def run(*cmd) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/rwkv-opt-trained"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random-too", action="store_true", help="also measure on fixed random tokens")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    train, held = write_corpus(a.work)
    cli = [sys.executable, "-m", "rwkv_opt.cli"]
    sft = a.work / "sft"
    if not (sft / "manifest.json").exists():
        run(*cli, "pipeline", "--target", "cpu-fp32", "--head", "sft", "--preset", "0.1b", "--no-verify", "-o", sft)
    stage1, stage2 = a.work / "stage1", a.work / "stage2"
    if not (stage1 / "model.pth").exists():
        run(
            *cli,
            "train",
            sft,
            "--data",
            train,
            "--steps",
            700,
            "--lr",
            1e-3,
            "--warmup",
            30,
            "--trainable",
            "last:2",
            "--threads",
            a.threads,
            "--log-every",
            50,
            "-o",
            stage1,
        )
    if not (stage2 / "model.pth").exists():
        run(
            *cli,
            "train",
            sft,
            "--checkpoint",
            stage1 / "model.pth",
            "--data",
            train,
            "--steps",
            1200,
            "--lr",
            6e-4,
            "--warmup",
            20,
            "--trainable",
            "all",
            "--threads",
            a.threads,
            "--log-every",
            50,
            "--no-eval",
            "-o",
            stage2,
        )
    qs = [
        sys.executable,
        HERE / "quant_speed.py",
        "--checkpoint",
        stage2 / "model.pth",
        "--no-speed",
        "--threads",
        a.threads,
        "--out",
        a.work / "artifacts",
    ]
    run(*qs, "--text", held, "--json", a.work / "accuracy-heldout.json")
    if a.random_too:
        run(*qs, "--json", a.work / "accuracy-random.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
