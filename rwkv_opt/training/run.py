"""`rwkv-opt train`: artifact (with a training head) + JSON Lines -> trained .pth, as a library call.

ARTIFACT/manifest.json ─ source checkpoint (path + digest, or a synthetic preset name)
ARTIFACT/model.onnx    ─ metadata rwkv_opt.train.* (head, seq, batch, trainable)
data.jsonl ─ tokens, windows, batches ─ Trainer (one ORT call per step) ─ OUT/model.pth
                                                                       ─ OUT/manifest.json
                                                                       ─ [OUT/train_step.onnx, eval.onnx,
                                                                          optimizer_state.npz]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from rwkv_opt.graph.contract import Meta
from rwkv_opt.artifact import MANIFEST_FILE, Manifest, SourceRef, load_proto, write_json
from rwkv_opt.outdir import staging_dir
from rwkv_opt.checkpoint.weights import Weights
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.training.data import all_batches, batches, read_jsonl, windows
from rwkv_opt.training.graph import Objective
from rwkv_opt.training.loop import TrainConfig, Trainer

PTH_FILE = "model.pth"
EVAL_BATCHES = 32
_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def training_head(artifact: Path) -> dict:
    """The training head recorded in `artifact` (head, seq, batch, trainable), or a clear refusal."""
    man = Manifest.read(artifact)
    heads = [h for h in man.heads if h in ("sft", "reinforce")]
    if not heads:
        raise RwkvOptError(
            f"{artifact} has no training head; build it with `rwkv-opt pipeline --head sft` (or --head reinforce)."
        )
    meta = {}
    model = Path(artifact) / "model.onnx"
    if model.is_file():
        meta = Meta.of(load_proto(model)).train
    source = man.source
    if not all(str(meta.get(k, "1")).isdigit() for k in ("seq", "batch")):
        raise RwkvOptError(
            f"{artifact} has a malformed training head record (seq, batch or source); rebuild it with "
            "`rwkv-opt pipeline --head sft`."
        )
    return {
        "head": heads[0],
        "seq": int(meta.get("seq", 64)),
        "batch": int(meta.get("batch", 1)),
        "trainable": meta.get("trainable", "all"),
        "source": source,
    }


def source_weights(head: dict, checkpoint: Path | None = None) -> Weights:
    """The artifact's source weights in the checkpoint's own parameterisation (see passes/training_heads.py),
    or `checkpoint`: another checkpoint of the same model (training may start from other weights)."""
    return SourceRef.from_manifest({"source": head["source"]}).load(checkpoint, same_weights=False)


def train(
    weights: Weights,
    config: TrainConfig,
    data: Path,
    steps: int,
    out: Path,
    *,
    dtype: str = "fp32",
    evaluate: bool = True,
    save_graphs: bool = False,
    log_every: int = 10,
    seed: int = 0,
    progress: Callable[[str], None] = _stderr,
    extra: dict | None = None,
) -> dict:
    """Train for `steps` AdamW steps on `data` and write OUT/model.pth (+ manifest); returns the manifest."""
    if dtype not in ("fp32", "fp16", "bf16"):
        raise RwkvOptError(f"unknown dtype '{dtype}'; choose fp32, fp16 or bf16.")
    if steps < 1:
        raise RwkvOptError("--steps must be at least 1.")
    t_start = time.perf_counter()
    cfg = weights.config
    examples = read_jsonl(data, config.objective, cfg.vocab)
    wins = windows(examples, config.seq)
    progress(
        f"[1/4] data: {len(examples)} rows -> {len(wins)} windows of <= {config.seq} tokens, "
        f"{sum(int(w.mask.sum()) for w in wins):,} target tokens ({config.objective.value})"
    )
    progress(
        f"[2/4] build training graphs ({cfg.n_layer} layers, C={cfg.n_embd}, V={cfg.vocab}, "
        f"batch {config.batch} x seq {config.seq}, trainable '{config.trainable}')"
    )
    trainer = Trainer(weights, config, progress)
    eval_set = all_batches(wins, config.batch, config.seq)[:EVAL_BATCHES]
    loss_before = trainer.evaluate(eval_set) if evaluate else None
    if loss_before is not None:
        progress(f"      eval loss before training: {loss_before:.4f} ({len(eval_set)} batches)")
    progress(
        f"[3/4] train {steps} steps (lr {config.lr:g}, warmup {config.warmup}, clip {config.max_grad_norm:g}, "
        f"weight decay {config.weight_decay:g})"
    )
    log, feed = [], batches(wins, config.batch, config.seq, seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        s = trainer.step(next(feed))
        log.append(
            {"step": s.step, "loss": s.loss, "grad_norm": s.grad_norm, "lr": s.lr, "seconds": round(s.seconds, 4)}
        )
        if s.step % log_every == 0 or s.step in (1, steps):
            rate = s.step / (time.perf_counter() - t0)
            progress(
                f"  step {s.step:>5}/{steps}  loss {s.loss:.4f}  grad-norm {s.grad_norm:.3g}  lr {s.lr:.3g}  "
                f"{rate:.2f} steps/s"
            )
    train_seconds = time.perf_counter() - t0
    loss_after = trainer.evaluate(eval_set) if evaluate else None
    if loss_after is not None:
        progress(f"      eval loss after training: {loss_after:.4f}")
    progress(f"[4/4] write {out}/{PTH_FILE} ({dtype})")
    manifest = {
        "tool": "rwkv-opt",
        "kind": "trained-checkpoint",
        "checkpoint": PTH_FILE,
        "dtype": dtype,
        "source": weights.manifest_source(),
        "train": {
            **config.to_dict(),
            "steps": steps,
            "seed": seed,
            "data": str(data),
            "rows": len(examples),
            "windows": len(wins),
            "trainable_tensors": trainer.trainable,
        },
        "loss": {
            "eval_before": loss_before,
            "eval_after": loss_after,
            "first_step": log[0]["loss"],
            "last_step": log[-1]["loss"],
        },
        "timing": {
            "build_seconds": round(trainer.build_seconds, 3),
            "session_seconds": round(trainer.session_seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "steps_per_second": round(steps / train_seconds, 4),
        },
        "log": log,
        **(extra or {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with staging_dir(out) as tmp:
        from rwkv_opt.checkpoint.torchzip import write_pth

        write_pth(tmp / PTH_FILE, _cast(trainer.state_dict(np.float32), dtype))
        if save_graphs:
            manifest["files"] = trainer.save_graphs(tmp)
        manifest["total_seconds"] = round(time.perf_counter() - t_start, 3)
        write_json(tmp / MANIFEST_FILE, manifest)
    return manifest


def _cast(sd: dict, dtype: str) -> dict:
    if dtype == "bf16":
        import ml_dtypes

        return {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    return {k: v.astype(_DTYPES[dtype]) for k, v in sd.items()}


def config_for(head: dict, **overrides) -> TrainConfig:
    """The TrainConfig for an artifact's head, with CLI overrides (None = keep the head's value)."""
    base = TrainConfig(
        objective=Objective(head["head"]), batch=head["batch"], seq=head["seq"], trainable=head["trainable"]
    )
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
