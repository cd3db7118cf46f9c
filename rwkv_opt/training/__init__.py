"""Training on stock onnxruntime: SFT and REINFORCE step graphs for a fixed (batch, seq).

graph.py   the training forward (checkpoint parameterisation, unrolled WKV) -> loss
step.py    backward (onnxsim.graph_grad, plain ONNX ops) + global-norm clip + AdamW in one graph;
           the eval graph (loss only); raw-gradient graph for checks
select.py  trainable subsets by name (all, lora, last:N, globs, !exclusions)
data.py    JSON Lines -> tokens (World or byte tokens) -> masked windows -> batches
loop.py    Trainer: one ORT call per step, state threaded as OrtValues
run.py     `rwkv-opt train`: artifact + data -> OUT/model.pth
"""

from rwkv_opt.training.graph import Objective, TrainShape, build_loss_graph, checkpoint_layout, training_params
from rwkv_opt.training.loop import TrainConfig, Trainer
from rwkv_opt.training.select import select_trainable
from rwkv_opt.training.step import build_eval_graph, build_grad_graph, build_step_graph

__all__ = [
    "Objective",
    "TrainShape",
    "TrainConfig",
    "Trainer",
    "build_loss_graph",
    "build_step_graph",
    "build_eval_graph",
    "build_grad_graph",
    "checkpoint_layout",
    "training_params",
    "select_trainable",
]
