"""Training heads `sft` and `reinforce`: mark an artifact as a training artifact.

    model (any target)  ->  same model + metadata rwkv_opt.train.{head, objective, seq, batch, trainable}

The training graphs are NOT derived from the inference graph, on purpose: the inference graph
stores `emb` with ln0 already folded in (and DeepEmbed's s_emb folded with it, Linear weights
transposed, maybe fp16 or fused). A folded embedding cannot be written back as the
`emb.weight` + `blocks.0.ln0.*` pair a BlinkDL .pth needs, so training from it could not close
the loop to a checkpoint that `rwkv-opt pipeline` and the official package load. Instead
`rwkv-opt train ARTIFACT` rebuilds the forward from the artifact's source checkpoint (its path
and digest are in manifest.json; synthetic sources are regenerated from their name) in the
checkpoint's own parameterisation, for the static (batch, seq) recorded here, and emits the
backward, clipping and AdamW as plain ONNX ops (rwkv_opt.training). The inference graph is
left untouched, so the pipeline still verifies it against the numpy reference.

Precondition: the model is an rwkv-opt graph (has rwkv_opt.* metadata) with no training head yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from rwkv_opt.graph.contract import Key
from rwkv_opt.passes.base import (
    Pass,
    PassConfig,
    PassResult,
    applied_passes,
    get_meta,
    mark_applied,
    register,
    set_meta,
)

HEAD_KEY = Key.TRAIN + "head"
TRAINING_HEADS = ("sft", "reinforce")


@dataclass(frozen=True)
class TrainingHeadConfig(PassConfig):
    seq: int = 64  # static sequence length of the training graphs (tokens per window)
    batch: int = 1  # static batch of the training graphs
    trainable: str = "all"  # default trainable selector (all, lora, last:N, globs; see rwkv_opt.training.select)

    def problem(self) -> str | None:
        if self.seq < 2 or self.batch < 1:
            return f"seq must be >= 2 and batch >= 1 (got seq={self.seq}, batch={self.batch})"
        return None


class _TrainingHead(Pass):
    Config = TrainingHeadConfig
    in_place = True  # records the head in the model's metadata

    def requires(self, model: onnx.ModelProto) -> str | None:
        if get_meta(model, Key.N_LAYER) is None:
            return "the model has no rwkv_opt metadata; build it with `rwkv-opt build` or `pipeline`"
        have = get_meta(model, HEAD_KEY) or next((p for p in applied_passes(model) if p in TRAINING_HEADS), None)
        if have:
            return f"the artifact already has the '{have}' training head; use one training head per artifact"
        return None

    def run(self, model: onnx.ModelProto) -> PassResult:
        c = self.config
        for key, value in (
            ("head", self.name),
            ("objective", self.name),
            ("seq", c.seq),
            ("batch", c.batch),
            ("trainable", c.trainable),
        ):
            set_meta(model, Key.TRAIN + key, str(value))
        mark_applied(model, self.name)
        return PassResult(
            model,
            True,
            [
                f"training artifact ({self.name}, {c.batch}x{c.seq}); "
                "`rwkv-opt train` builds its step and eval graphs from the source checkpoint"
            ],
        )


@register
class SftHead(_TrainingHead):
    name = "sft"
    description = "training head: masked next-token cross-entropy (graphs built by `rwkv-opt train`)"


@register
class ReinforceHead(_TrainingHead):
    name = "reinforce"
    description = "training head: token-level reward-weighted log-likelihood (graphs built by `rwkv-opt train`)"
