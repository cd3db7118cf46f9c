"""A Session over onnx.reference instead of ORT, for graphs ORT's CPU EP cannot run (bf16).

It rounds every op's output to its dtype and accumulates MatMul/reductions/LayerNorm in fp32,
as a GPU EP does (rwkv_opt.passes._precision.rounding_evaluator). It is slow: tiny models only.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from rwkv_opt.artifact import model_path
from rwkv_opt.config import ModelConfig
from rwkv_opt.passes._precision import rounding_evaluator
from rwkv_opt.runtime.session import Session

_ELEM = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


class EvaluatorSession(Session):
    def __init__(self, artifact, max_chunk: int = 1024):  # noqa: super().__init__ would start ORT
        self.path = model_path(Path(artifact))
        model = onnx.load(str(self.path))
        self.meta = {p.key: p.value for p in model.metadata_props}
        self.config = ModelConfig.from_dict(json.loads(self.meta["rwkv_opt.config"]))
        self.logits_mode = self.meta.get("rwkv_opt.logits", "all")
        self.ev = rounding_evaluator(model)
        self.output_names = [o.name for o in model.graph.output]
        self._in_types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        self.max_chunk = max_chunk
        self.has_sampler = False

    def _state_dtype(self, name: str):
        import ml_dtypes

        return _ELEM.get(self._in_types[name], ml_dtypes.bfloat16)

    def run(self, feed: dict) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.ev.run(None, feed)))
