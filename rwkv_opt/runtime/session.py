"""`Session(dir).forward(tokens, state) -> (logits, state)` over an rwkv-opt artifact.

The model's facts (layers, sizes, logits mode, state dtypes) are read from the model's
metadata_props, never guessed from tensor names. State is a dict of input name -> array in
the model's contract layout (see rwkv_opt.graph.contract). Inputs are checked before ORT sees them
(integer ids of shape (batch, seq), every state tensor with the model's shape and dtype and the
tokens' batch): each violation is one RwkvOptError sentence, never a silent cast or broadcast.
"""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort

from rwkv_opt.artifact import load_proto, model_config, model_path, verify_files, verify_recorded
from rwkv_opt.config import Provider
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph import contract
from rwkv_opt.graph.contract import Meta
from rwkv_opt.graph.decode import with_decode_path
from rwkv_opt.graph.int8_twins import applies, with_int8_twins
from rwkv_opt.progress import release_freed_memory


def available_providers() -> list[Provider]:
    have = set(ort.get_available_providers())
    return [p for p in Provider if p.ort_name in have]


def session_options(
    threads: int | None = None,
    opt_level: str = "all",
    profile: str | None = None,
    low_memory: bool = False,
    quantized: bool = False,
):
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


def in_memory_model_options(options, folder: Path, arrays: dict[str, np.ndarray]) -> list:
    """Ready `options` for a model ORT gets as bytes: its external data is found in `folder` (not beside the
    cwd), and `arrays` (name -> array, e.g. graph/int8_twins.py's) are its external initializers. Returns their
    OrtValues, which ORT reads while the session is made (it copies them, then pre-packs): keep them until then."""
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder.resolve()))
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
    if values:
        options.add_external_initializers(list(arrays), values)
    return values


# what onnxruntime raises for a model it cannot load (a damaged file, a missing .data file, a bad graph)
_ORT_LOAD_ERRORS = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, n)
    for n in (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "InvalidProtobuf",
        "InvalidGraph",
        "RuntimeException",
        "NotImplemented",
    )
)


class Session:
    """An ORT session over an artifact directory (or a model.onnx path)."""

    def __init__(
        self,
        artifact,
        provider: Provider | str = Provider.CPU,
        threads: int | None = None,
        opt_level: str = "all",
        profile: str | None = None,
        max_chunk: int = 1024,
        low_memory: bool = False,
        verify: bool = False,
        decode_graph: bool = False,
        int8_twins: bool | None = None,
    ):
        """`verify`: check every file against the sha256 its manifest records first (reads them all once).
        `decode_graph`: one-token calls take graph/decode.py's decode path (model.onnx specialised to
        T == 1, built at load, same weights). Off by default: on ORT's CPU EP it measured within noise of
        model.onnx (reports/decode.md), so it is there to be measured where the per-layer If may cost more
        (a GPU EP), not turned on blindly. Its If holds every weight until the session is made: the load's peak
        is ~2x (1.5B cpu-int4: +2.52 vs +1.37 GiB), the memory after load the same.
        `int8_twins`: on the CPU EP, a 4-bit artifact's block MatMulNBits run as DynamicQuantizeMatMul over
        int8 twins of their weights, made at load (graph/int8_twins.py: prefill 1.35-1.93x on an Intel Xeon,
        1.2-1.8x on an AMD EPYC; decode within noise on the Xeon, 2.5-15% slower on the EPYC; the files
        unchanged).
        None (default): on unless `low_memory`. `self.int8_twins` is how many matrices got one."""
        self.path = model_path(Path(artifact))
        if verify:
            verify_files(self.path.parent)
        proto = load_proto(self.path)  # the structure (external weights stay on disk; inline ones do not)
        self.meta = {p.key: p.value for p in proto.metadata_props}
        self.provider = Provider(provider)
        int8 = (not low_memory if int8_twins is None else int8_twins) and self.provider is Provider.CPU
        int8 = int8 and applies(proto)
        decode_from = proto if decode_graph or int8 else None
        del proto  # not held while ORT loads its own copy unless a graph is built from it
        self.config = model_config(self.path, self.meta)
        meta = Meta(self.meta)
        self.logits_mode = meta.logits
        if self.provider not in available_providers():
            raise RwkvOptError(
                f"execution provider '{self.provider.value}' is not available in this onnxruntime "
                f"(have: {', '.join(p.value for p in available_providers())}); "
                "install onnxruntime-gpu for CUDA or use --providers cpu."
            )
        providers = [self.provider.ort_name] + (["CPUExecutionProvider"] if self.provider is not Provider.CPU else [])
        so = session_options(threads, opt_level, profile, low_memory, quantized=meta.quantization is not None)
        if meta.sampler == "sampling":  # its overridable defaults would each log a warning
            so.log_severity_level = 3  # (passes/sampling_head.py); errors still show
        self.sess = self._load(so, providers, decode_from, int8, decode_graph)
        del decode_from
        if self.int8_twins:  # the twins ORT has copied lie freed in malloc's heap (0.57 GiB at 1.5B)
            release_freed_memory()
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.max_chunk = max_chunk
        # the sampling head's `occurence` has a default, so ORT lists it as an overridable initializer
        self.has_sampler = "occurence" in self.inputs or meta.sampler == "sampling"

    def _load(
        self, options, providers, proto: onnx.ModelProto | None, int8: bool, decode: bool
    ) -> ort.InferenceSession:
        """The ORT session; a model ORT cannot load is one sentence (naming the changed file when the
        manifest's digests tell which). With `proto` (model.onnx's structure), the graph run is built from
        it: graph/int8_twins.py's when `int8` and it applies, then graph/decode.py's with_decode_path of
        that when `decode` (one session either way, so each weight is pre-packed once)."""
        model, arrays = None, {}
        if proto is not None and int8:
            try:
                model, arrays = with_int8_twins(proto, self.path.parent) or (None, {})
            except (OSError, ValueError, onnx.checker.ValidationError) as e:  # a weight file missing or cut short
                verify_recorded(self.path.parent)
                raise RwkvOptError(f"cannot read the weights of {self.path} ({e}); rebuild the artifact.") from None
        path = with_decode_path(model if model is not None else proto) if proto is not None and decode else None
        model = path or model
        self.decode_path, self.int8_twins = path is not None, len(arrays)
        try:
            if model is None:
                return ort.InferenceSession(str(self.path), options, providers=providers)
            values = in_memory_model_options(options, self.path.parent, arrays)
            sess = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
            del values  # ORT has copied them now
            return sess
        except _ORT_LOAD_ERRORS as e:
            verify_recorded(self.path.parent)  # a missing or changed file is the better sentence
            reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(e).splitlines()[0] if str(e) else "")
            reason = re.split(r"\.\s", reason)[0][:200] or type(e).__name__
            raise RwkvOptError(f"onnxruntime cannot load {self.path} ({reason}); rebuild the artifact.") from None

    # ---- state ----------------------------------------------------------------------------------
    def _state_dtype(self, name: str):
        t = self.inputs[name].type  # e.g. 'tensor(float)'
        return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": ml_dtypes.bfloat16}.get(
            t, np.float32
        )

    def zero_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        return {name: np.zeros(shape, dtype) for name, (shape, dtype) in self.zero_state_spec(batch).items()}

    # ---- running --------------------------------------------------------------------------------
    def run(self, feed: dict) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.sess.run(None, feed)))

    def check_tokens(self, tokens) -> np.ndarray:
        """tokens (B,T) or (T,) of integer ids in [0, vocab) -> an int64 (B,T) array; anything else is refused."""
        try:
            arr = np.asarray(tokens)
        except ValueError:
            raise RwkvOptError(
                "token ids must form a rectangular (batch, seq) array; the rows differ in length."
            ) from None
        if arr.dtype.kind not in "iu":
            raise RwkvOptError(
                f"token ids must be integers, got {arr.dtype} values; convert them with "
                "np.asarray(ids, np.int64) after checking they are whole numbers."
            )
        if arr.ndim not in (1, 2):
            raise RwkvOptError(f"token ids must have shape (batch, seq) or (seq,), got shape {arr.shape}.")
        arr = np.atleast_2d(arr)
        if arr.shape[1] == 0 or arr.shape[0] == 0:
            raise RwkvOptError("forward() needs at least one token per sequence.")
        if arr.min() < 0 or arr.max() >= self.config.vocab:
            raise RwkvOptError(f"token ids must be in [0, {self.config.vocab}); got {arr.min()}..{arr.max()}.")
        return arr.astype(np.int64, copy=False)

    def check_state(self, state, batch: int) -> None:
        """Refuse a state that is not exactly the model's: every state input, its shape for `batch`, its dtype."""
        if not isinstance(state, dict):
            raise RwkvOptError(f"state must be a dict of input name -> array, got {type(state).__name__}.")
        want = self.zero_state_spec(batch)
        missing = [k for k in want if k not in state]
        if missing:
            raise RwkvOptError(f"state lacks '{missing[0]}'; pass the state forward() returned, or None to start.")
        extra = [k for k in state if k not in want]
        if extra:
            raise RwkvOptError(f"state has '{extra[0]}', which is not a state input of this model.")
        for name, (shape, dtype) in want.items():
            v = state[name]
            got = getattr(v, "shape", None)
            if got is not None and len(got) and got[0] != batch and tuple(got[1:]) == shape[1:]:
                raise RwkvOptError(
                    f"state '{name}' has batch {got[0]} but the tokens have batch {batch}; "
                    "use a state of the same batch."
                )
            if not isinstance(v, np.ndarray) or v.shape != shape or v.dtype != dtype:
                raise RwkvOptError(
                    f"state '{name}' must be a {np.dtype(dtype).name} array of shape {shape}, got "
                    f"{getattr(v, 'dtype', type(v).__name__)} {got}."
                )

    def zero_state_spec(self, batch: int) -> dict[str, tuple[tuple[int, ...], type]]:
        """Each state input's (shape, dtype) for `batch`, from the model's config and input types."""
        c = self.config
        spec = {}
        for i in range(c.n_layer):
            att, wkv, ffn = contract.state_inputs(i)
            spec[att] = ((batch, 1, c.n_embd), self._state_dtype(att))
            spec[wkv] = ((batch, c.n_head, c.head_size, c.head_size), np.float32)
            spec[ffn] = ((batch, 1, c.n_embd), self._state_dtype(ffn))
        return spec

    def _step(self, tokens: np.ndarray, state: dict, extra: dict | None = None):
        feed = {contract.TOKENS: tokens, **state, **(extra or {})}
        out = self.run(feed)
        return out, {dst: out[src] for src, dst in contract.state_feedback(self.config.n_layer).items()}

    def stepper(self, state: dict | None = None, batch: int = 1, carry: dict | None = None):
        """A decode loop's `Stepper` (runtime/stepper.py): one token per row per step, starting from `state`
        (a copy is taken), its buffers reused from step to step (no allocation or copy per step)."""
        from rwkv_opt.runtime.stepper import Stepper

        return Stepper(self, state, batch, carry)

    def forward(self, tokens, state: dict | None = None):
        """tokens (B,T) or (T,) -> (logits (B,T,V) or (B,1,V) for a last-logits model, new state).

        Prompts longer than max_chunk are fed in chunks carrying the state, so memory stays bounded.
        """
        tokens = self.check_tokens(tokens)
        if state is None:
            state = self.zero_state(tokens.shape[0])
        else:
            self.check_state(state, tokens.shape[0])
        logits = []
        for s in range(0, tokens.shape[1], self.max_chunk):
            out, state = self._step(tokens[:, s : s + self.max_chunk], state)
            logits.append(out[contract.LOGITS])
        if self.logits_mode == "last" or len(logits) == 1:
            return logits[-1], state
        return np.concatenate(logits, axis=1), state
