"""The training loop: build the step and eval graphs once, then one ORT call per step.

Trainable parameters and AdamW moments live as OrtValues between calls (each step's outputs are
the next step's inputs, no numpy round trip); only the batch and seven scalars are fed per step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from rwkv_opt.checkpoint.weights import Weights
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.training.data import Batch
from rwkv_opt.training.graph import LOSS, NLL, Objective, TrainShape, build_loss_graph, checkpoint_layout
from rwkv_opt.training.select import select_trainable
from rwkv_opt.training.step import GRAD_NORM, bake, build_eval_graph, build_step_graph, m_name, v_name


@dataclass(frozen=True)
class TrainConfig:
    objective: Objective = Objective.SFT
    batch: int = 1
    seq: int = 64
    trainable: str = "all"
    lr: float = 1e-3
    warmup: int = 0  # linear warm-up steps, then constant lr
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled; 2-D *.weight tensors only
    max_grad_norm: float = 1.0  # <= 0: no clipping
    threads: int = 0  # ORT intra-op threads (0: ORT's default)

    def lr_at(self, step: int) -> float:
        return self.lr * min(1.0, step / self.warmup) if self.warmup > 0 else self.lr

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objective"] = self.objective.value
        return d


@dataclass
class StepLog:
    step: int
    loss: float
    grad_norm: float
    lr: float
    seconds: float
    tokens: int


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ov(a: np.ndarray) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))


class Trainer:
    """Trains `weights` in place of nothing: the source arrays are never modified."""

    def __init__(self, weights: Weights, config: TrainConfig, progress: Callable[[str], None] = lambda s: None):
        self.weights, self.config = weights, config
        t0 = time.perf_counter()
        self.shape = TrainShape(config.batch, config.seq)
        lg = build_loss_graph(weights, config.objective, self.shape)
        self.names = list(lg.params)
        self.trainable = select_trainable(config.trainable, self.names, weights.config.n_layer)
        self.n_trainable = sum(lg.params[k].size for k in self.trainable)
        progress(f"  {len(self.trainable)} of {len(self.names)} tensors trainable ({self.n_trainable:,} parameters)")
        self.step_graph = build_step_graph(lg, self.trainable, frozen="inputs")
        self.eval_model = build_eval_graph(lg, self.trainable, frozen="inputs")
        self.build_seconds = time.perf_counter() - t0
        progress(
            f"  step graph {len(self.step_graph.model.graph.node):,} nodes (forward + backward + AdamW), "
            f"built in {self.build_seconds:.1f}s"
        )
        t0 = time.perf_counter()
        self._step_sess = _session(self.step_graph.model, config.threads)
        self._eval_sess = _session(self.eval_model, config.threads)
        self.session_seconds = time.perf_counter() - t0
        progress(f"  onnxruntime sessions ready in {self.session_seconds:.1f}s")
        # the initial arrays are only referenced by the first step's inputs, so they are freed after it
        self._frozen = {k: a for k, a in lg.params.items() if k not in set(self.trainable)}
        self._frozen_ov = {k: _ov(a) for k, a in self._frozen.items()}  # aliases, shared by both sessions
        self._state: dict[str, ort.OrtValue] = {}
        for p in self.trainable:
            a = lg.params[p]
            self._state[p] = _ov(a)
            self._state[m_name(p)] = _ov(np.zeros_like(a))
            self._state[v_name(p)] = _ov(np.zeros_like(a))
        self._outputs = [LOSS, GRAD_NORM] + list(self.step_graph.state.values())
        self.steps_done = 0

    def step(self, batch: Batch) -> StepLog:
        """One AdamW step on `batch` (one ORT call)."""
        c = self.config
        t = self.steps_done + 1
        lr = c.lr_at(t)
        scalars = {
            "lr": lr,
            "step": float(t),
            "beta1": c.beta1,
            "beta2": c.beta2,
            "eps": c.eps,
            "weight_decay": c.weight_decay,
            "max_grad_norm": c.max_grad_norm if c.max_grad_norm > 0 else np.inf,
        }
        feeds = {k: _ov(v) for k, v in batch.feeds(c.objective).items()}
        feeds.update({k: _ov(np.asarray(v, np.float32)) for k, v in scalars.items()})
        feeds.update(self._state)
        feeds.update(self._frozen_ov)
        t0 = time.perf_counter()
        outs = self._step_sess.run_with_ort_values(self._outputs, feeds)
        dt = time.perf_counter() - t0
        loss, gnorm = float(outs[0].numpy()), float(outs[1].numpy())
        if not np.isfinite(loss):
            raise RwkvOptError(f"the loss became {loss} at step {t}; lower --lr or keep --max-grad-norm on.")
        self._state = dict(zip(self.step_graph.state, outs[2:]))
        self.steps_done = t
        return StepLog(t, loss, gnorm, lr, dt, int(batch.mask.sum()))

    def evaluate(self, batches: list[Batch]) -> float:
        """Target-weighted mean loss over `batches` with the current parameters (eval graph)."""
        total, count = 0.0, 0.0
        params = {**self._frozen_ov, **{p: self._state[p] for p in self.trainable}}
        for b in batches:
            feeds = {k: _ov(v) for k, v in b.feeds(self.config.objective).items()}
            loss, _ = self._eval_sess.run_with_ort_values([LOSS, NLL], {**feeds, **params})
            n = float(b.mask[:, 1:].sum())
            total += float(loss.numpy()) * max(n, 1.0)
            count += n
        return total / max(count, 1.0)

    def params(self) -> dict[str, np.ndarray]:
        """Every trained tensor in the training layout: current values for trainable ones."""
        return {k: self._frozen[k] if k in self._frozen else self._state[k].numpy() for k in self.names}

    def state_dict(self, dtype=np.float32) -> dict[str, np.ndarray]:
        """The model as a BlinkDL state dict (checkpoint keys and shapes)."""
        return checkpoint_layout(self.params(), self.weights, dtype)

    def save_graphs(self, out: Path) -> list[str]:
        """train_step.onnx, eval.onnx (current weights baked in) and optimizer_state.npz in `out`."""
        from rwkv_opt.artifact import save_model

        out = Path(out)
        save_model(bake(self.step_graph.model, self._frozen), out / "train_step.onnx")
        lg = build_loss_graph(self.weights, self.config.objective, self.shape, params=self.params())
        save_model(build_eval_graph(lg), out / "eval.onnx")
        state = {k: v.numpy() for k, v in self._state.items()}
        np.savez(out / "optimizer_state.npz", step=np.int64(self.steps_done), **state)
        (out / "train_step.json").write_text(
            json.dumps(
                {
                    "inputs": {
                        "data": list(self.step_graph.data_inputs),
                        "scalars": ["lr", "step", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm"],
                    },
                    "state": self.step_graph.state,
                    "outputs": [LOSS, GRAD_NORM],
                    "config": self.config.to_dict(),
                },
                indent=2,
            )
        )
        return ["train_step.onnx", "eval.onnx", "optimizer_state.npz", "train_step.json"]
