"""`rwkv-opt train`: thin CLI over rwkv_opt.training.run (registered by rwkv_opt.cli)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rwkv_opt.errors import RwkvOptError

MAX_SEQ = 16384  # longer rows are cut into windows of --seq tokens anyway; past this one step's activations
MAX_BATCH = 1024  # outgrow any machine's memory


def _check_options(a) -> None:
    """Refuse an option value out of range in one sentence, before the artifact or data are read."""
    ranges = {
        "--batch": (a.batch, 1, MAX_BATCH),
        "--seq": (a.seq, 2, MAX_SEQ),
        "--steps": (a.steps, 1, None),
        "--log-every": (a.log_every, 1, None),
        "--threads": (a.threads, 1, None),
        "--warmup": (a.warmup, 0, None),
    }
    for flag, (v, lo, hi) in ranges.items():
        if v is not None and (v < lo or hi is not None and v > hi):
            raise RwkvOptError(f"{flag} must be {f'between {lo} and {hi}' if hi else f'at least {lo}'}, got {v}.")
    rules = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1, "": lambda v: True}
    floats = {
        "--lr": (a.lr, "> 0"),
        "--eps": (a.eps, "> 0"),
        "--weight-decay": (a.weight_decay, ">= 0"),
        "--beta1": (a.beta1, "in [0, 1)"),
        "--beta2": (a.beta2, "in [0, 1)"),
        "--max-grad-norm": (a.max_grad_norm, ""),
    }
    for flag, (v, rule) in floats.items():
        if v is not None and not (math.isfinite(v) and rules[rule](v)):
            raise RwkvOptError(f"{flag} must be a finite number {rule}".rstrip() + f", got {v}.")


def cmd_train(a) -> int:
    from rwkv_opt.training.run import config_for, source_weights, train, training_head

    _check_options(a)
    head = training_head(a.artifact)
    config = config_for(
        head,
        batch=a.batch,
        seq=a.seq,
        trainable=a.trainable,
        lr=a.lr,
        warmup=a.warmup,
        beta1=a.beta1,
        beta2=a.beta2,
        eps=a.eps,
        weight_decay=a.weight_decay,
        max_grad_norm=a.max_grad_norm,
        threads=a.threads,
    )
    weights = source_weights(head, a.checkpoint)
    m = train(
        weights,
        config,
        a.data,
        a.steps,
        a.output,
        dtype=a.dtype,
        evaluate=not a.no_eval,
        save_graphs=a.save_graphs,
        log_every=a.log_every,
        seed=a.seed,
        extra={"artifact": str(a.artifact)},
    )
    loss = m["loss"]
    if loss["eval_before"] is not None:
        print(
            f"{head['head']}: eval loss {loss['eval_before']:.4f} -> {loss['eval_after']:.4f} "
            f"in {a.steps} steps ({m['timing']['steps_per_second']:.2f} steps/s)"
        )
    else:
        print(f"{head['head']}: step loss {loss['first_step']:.4f} -> {loss['last_step']:.4f} in {a.steps} steps")
    print(
        f"trained checkpoint: {Path(a.output) / m['checkpoint']}  "
        f"(next: rwkv-opt pipeline --checkpoint {Path(a.output) / m['checkpoint']} -o DIR)"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune an artifact's weights (SFT or REINFORCE) and write a .pth",
        description="Train with the artifact's training head (pipeline --head sft|reinforce): one "
        "onnxruntime call per AdamW step. Data: JSON Lines, one object per line: "
        '{"text": "..."} for SFT (optional "prompt": context, not trained on); '
        '{"text": "...", "reward": 1.0}, {"text": "...", "rewards": [one per token]} '
        'or {"segments": [{"text": "...", "reward": 1.0}, ...]} for REINFORCE.',
    )
    p.add_argument("artifact", type=Path, help="artifact directory built with `pipeline --head sft|reinforce`")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help='JSON Lines: {"text"} (+"prompt") for SFT; {"text","reward"|"rewards"} or {"segments"} for REINFORCE',
    )
    p.add_argument("--steps", type=int, default=100, help="AdamW steps (default 100)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default 0)")
    p.add_argument(
        "--trainable",
        help="what trains: all, lora, last:N, globs over checkpoint keys, !exclusions "
        "(comma-separated; default: the head's, usually all)",
    )
    p.add_argument("--batch", type=int, help="rows per step (default: the head's, 1)")
    p.add_argument("--seq", type=int, help="tokens per window (default: the head's, 64)")
    p.add_argument("--weight-decay", type=float, help="decoupled weight decay on 2-D *.weight tensors (default 0)")
    p.add_argument("--max-grad-norm", type=float, help="global gradient-norm clip, <= 0 disables (default 1.0)")
    p.add_argument("--beta1", type=float, help=argparse.SUPPRESS)
    p.add_argument("--beta2", type=float, help=argparse.SUPPRESS)
    p.add_argument("--eps", type=float, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--log-every", type=int, default=10, help="progress line every N steps")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the written .pth")
    p.add_argument("--no-eval", action="store_true", help="skip the eval-graph loss before and after training")
    p.add_argument(
        "--save-graphs", action="store_true", help="also write train_step.onnx, eval.onnx and optimizer_state.npz"
    )
    p.add_argument("--checkpoint", type=Path, help="source .pth to train (default: the artifact's own source)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory (model.pth, manifest.json)")
    p.set_defaults(func=cmd_train)
