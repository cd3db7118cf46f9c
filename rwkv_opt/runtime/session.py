"""`Session(dir).forward(tokens, state) -> (logits, state)` over an rwkv-opt artifact.

The model's facts (layers, sizes, logits mode, state dtypes) are read from the model's
metadata_props, never guessed from tensor names. State is a dict of input name -> array in
the model's contract layout (see rwkv_opt.graph.contract).
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort

from rwkv_opt.artifact import model_path
from rwkv_opt.config import ModelConfig, Provider
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph import contract


def available_providers() -> list[Provider]:
    have = set(ort.get_available_providers())
    return [p for p in Provider if p.ort_name in have]


def session_options(threads: int | None = None, opt_level: str = "all", profile: str | None = None,
                    low_memory: bool = False, quantized: bool = False):
    """ORT options for our models: intra-op `threads`, one inter-op thread (the graph is one chain),
    ORT's graph optimizations at `opt_level`. ORT's saved optimized model is not used: measured on the
    0.1B cpu-fp32 artifact (2 cores) it cuts session load from 0.41 to 0.30-0.35 s, for a second,
    CPU-specific (NCHWc) copy of the model on disk. ORT_PARALLEL execution was 1.3-1.6x slower at decode."""
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if low_memory:  # measured in reports/scale.md: what a verification run can do without
        so.enable_cpu_mem_arena = False
        if not quantized:  # no packed copy of each float weight: the mapped file pages serve instead
            so.add_session_config_entry("session.disable_prepacking", "1")
        # (MatMulNBits unpacked falls back to dequantizing per call: 23x slower and a higher peak)
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return so


def _read_meta(path: Path) -> dict[str, str]:
    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


class Session:
    """An ORT session over an artifact directory (or a model.onnx path)."""

    def __init__(self, artifact, provider: Provider | str = Provider.CPU, threads: int | None = None,
                 opt_level: str = "all", profile: str | None = None, max_chunk: int = 1024,
                 low_memory: bool = False):
        self.path = model_path(Path(artifact))
        self.meta = _read_meta(self.path)
        if "rwkv_opt.config" not in self.meta:
            raise RwkvOptError(f"{self.path} has no rwkv-opt metadata; build it with `rwkv-opt build` or `pipeline`.")
        self.config = ModelConfig.from_dict(json.loads(self.meta["rwkv_opt.config"]))
        self.logits_mode = self.meta.get("rwkv_opt.logits", "all")
        self.provider = Provider(provider)
        if self.provider not in available_providers():
            raise RwkvOptError(f"execution provider '{self.provider.value}' is not available in this onnxruntime "
                               f"(have: {', '.join(p.value for p in available_providers())}); "
                               "install onnxruntime-gpu for CUDA or use --providers cpu.")
        providers = [self.provider.ort_name] + (["CPUExecutionProvider"] if self.provider is not Provider.CPU else [])
        so = session_options(threads, opt_level, profile, low_memory, quantized="rwkv_opt.quantization" in self.meta)
        if self.meta.get("rwkv_opt.head") == "sampling":  # its overridable defaults would each log a warning
            so.log_severity_level = 3                       # (passes/sampling_head.py); errors still show
        self.sess = ort.InferenceSession(str(self.path), so, providers=providers)
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.max_chunk = max_chunk
        # the sampling head's `occurence` has a default, so ORT lists it as an overridable initializer
        self.has_sampler = "occurence" in self.inputs or self.meta.get("rwkv_opt.head") == "sampling"

    # ---- state ----------------------------------------------------------------------------------
    def _state_dtype(self, name: str):
        t = self.inputs[name].type  # e.g. 'tensor(float)'
        return {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(bfloat16)": ml_dtypes.bfloat16}.get(t, np.float32)

    def zero_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        c = self.config
        st = {}
        for i in range(c.n_layer):
            att, wkv, ffn = contract.state_inputs(i)
            st[att] = np.zeros((batch, 1, c.n_embd), self._state_dtype(att))
            st[wkv] = np.zeros((batch, c.n_head, c.head_size, c.head_size), np.float32)
            st[ffn] = np.zeros((batch, 1, c.n_embd), self._state_dtype(ffn))
        return st

    # ---- running --------------------------------------------------------------------------------
    def run(self, feed: dict) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.sess.run(None, feed)))

    def _step(self, tokens: np.ndarray, state: dict, extra: dict | None = None):
        feed = {contract.TOKENS: tokens, **state, **(extra or {})}
        out = self.run(feed)
        new_state = {}
        for i in range(self.config.n_layer):
            for src, dst in zip(contract.state_outputs(i), contract.state_inputs(i)):
                new_state[dst] = out[src]
        return out, new_state

    def forward(self, tokens, state: dict | None = None):
        """tokens (B,T) or (T,) -> (logits (B,T,V) or (B,1,V) for a last-logits model, new state).

        Prompts longer than max_chunk are fed in chunks carrying the state, so memory stays bounded.
        """
        tokens = np.atleast_2d(np.asarray(tokens, dtype=np.int64))
        if tokens.shape[1] == 0:
            raise RwkvOptError("forward() needs at least one token per sequence.")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab:
            raise RwkvOptError(f"token ids must be in [0, {self.config.vocab}); got {tokens.min()}..{tokens.max()}.")
        state = self.zero_state(tokens.shape[0]) if state is None else state
        logits = []
        for s in range(0, tokens.shape[1], self.max_chunk):
            out, state = self._step(tokens[:, s:s + self.max_chunk], state)
            logits.append(out[contract.LOGITS])
        if self.logits_mode == "last" or len(logits) == 1:
            return logits[-1], state
        return np.concatenate(logits, axis=1), state
