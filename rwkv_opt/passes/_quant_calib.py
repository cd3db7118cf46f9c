"""Calibration for the quantizers that need activations (GPTQ): token sequences and H = X^T X.

Tokens come from a user text file (World tokenizer, cut into `length`-token windows) or, by
default, are sampled from the model being quantized: a random first token per sequence, then
each next token drawn from softmax(logits) at temperature 1. Either way the model runs one
token at a time carrying its state, so every MatMul (the last-position head included) sees
every position; the inputs of the requested MatMuls are read out as extra graph outputs and
reduced to H = X^T X per input tensor ((K, K), float32). Each step's activations go to disk at once
(SpilledHessians) and each H is formed only when its matrix is quantized, so memory holds one H at
a time: keeping every H of a 1.5B model (Σ K^2 floats) would take 8.8 GiB.

Defaults (16 x 256 = 4096 tokens) were set on the 0.1B shape: with 512 tokens GPTQ over-fitted
(K = 3072 inputs, H of rank 512) and its held-out error was worse than round-to-nearest.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from rwkv_opt.artifact import initializer_bytes, save_model
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph import contract
from rwkv_opt.progress import phase, tick
from rwkv_opt.tensorstore import active, has_external

_FLUSH = 32  # steps whose activations are summed as one X^T X (the grouping fixes H's float rounding)
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


@dataclass(frozen=True)
class Calibration:
    text: str = ""  # UTF-8 text file; empty: sample sequences from the model itself
    sequences: int = 16  # sequences run side by side (the batch)
    length: int = 256  # tokens per sequence
    seed: int = 0


def text_tokens(
    path: str,
    sequences: int,
    length: int,
    vocab: int,
    *,
    what: str = "calibration text",
    instead: str = "leave it empty to sample calibration sequences from the model",
) -> np.ndarray:
    """(sequences, length) token windows from a text file, in file order. `what` names the file in
    the refusals and `instead` says what to do rather than pass it."""
    from rwkv_opt.reference.tokenizer import load_world_tokenizer

    p = Path(path)
    if not p.is_file():
        raise RwkvOptError(f"{what} {path} does not exist; pass a UTF-8 text file or {instead}.")
    ids = np.asarray(load_world_tokenizer().encode(p.read_text(encoding="utf-8")), np.int64)
    if ids.size < length:
        raise RwkvOptError(
            f"{what} {path} has {ids.size} tokens; it needs at least {length} "
            f"(one sequence of {length} tokens); pass a longer text or {instead}."
        )
    if ids.max() >= vocab:
        raise RwkvOptError(
            f"{what} {path} tokenizes to ids up to {ids.max()}, but the model's vocabulary "
            f"has {vocab} rows; use a World-vocabulary model or {instead}."
        )
    n = min(sequences, ids.size // length)
    return ids[: n * length].reshape(n, length)


class _Runner:
    """The model in ORT (CPU, 2 threads) with `extra` tensors exposed as outputs, stepped token by token."""

    def __init__(self, model: onnx.ModelProto, extra: list[str]):
        import onnxruntime as ort

        m = onnx.ModelProto()
        m.CopyFrom(model)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in extra if t not in have)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
        so.enable_cpu_mem_arena = False  # the fp32 weights stay mapped pages: no packed copies beside them
        so.add_session_config_entry("session.disable_prepacking", "1")
        if has_external(m):  # weightless, under a TensorStore: ORT maps the weights from the store's file
            path = active().session_path(m, "calibration.onnx")
            self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            path.unlink()
        elif initializer_bytes(m) > (1 << 30):  # protobuf's 2 GB limit: go through a file
            with tempfile.TemporaryDirectory() as d:
                save_model(m, Path(d) / "calib.onnx", external=True)
                self.sess = ort.InferenceSession(str(Path(d) / "calib.onnx"), so, providers=["CPUExecutionProvider"])
        else:
            self.sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.names = [o.name for o in self.sess.get_outputs()]
        self.n_layer = sum(1 for n in self.inputs if n.startswith("wkv_state_"))

    def zero_state(self, batch: int) -> dict[str, np.ndarray]:
        st = {}
        for name, i in self.inputs.items():
            if name == contract.TOKENS:
                continue
            shape = [d if isinstance(d, int) else batch for d in i.shape]
            st[name] = np.zeros(shape, _NP.get(i.type, np.float32))
        return st

    def step(self, tok_B1: np.ndarray, state: dict) -> tuple[dict, dict]:
        out = dict(zip(self.names, self.sess.run(None, {contract.TOKENS: tok_B1, **state})))
        return out, {dst: out[src] for src, dst in contract.state_feedback(self.n_layer).items()}


def hessians(
    model: onnx.ModelProto, tensors: list[str], vocab: int, cal: Calibration
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """H = X^T X (float32, (K, K)) for each tensor in `tensors`; also returns the tokens used."""
    rng = np.random.default_rng(cal.seed)
    given = text_tokens(cal.text, cal.sequences, cal.length, vocab) if cal.text else None
    batch = given.shape[0] if given is not None else cal.sequences
    run = _Runner(model, tensors)
    state = run.zero_state(batch)
    H = SpilledHessians()
    tokens = np.zeros((batch, cal.length), np.int64)
    tokens[:, 0] = given[:, 0] if given is not None else rng.integers(0, vocab, batch)
    with phase("gptq calibration", cal.length, "steps"):
        for t in range(cal.length):
            out, state = run.step(tokens[:, t : t + 1], state)
            group_ends = (t + 1) % _FLUSH == 0 or t + 1 == cal.length
            for name in tensors:  # to disk at once: 32 steps of a 1.5B's inputs at batch 16 are 1 GiB
                x = out[name]
                H.append(name, x.reshape(-1, x.shape[-1]), group_ends)
            if t + 1 < cal.length:
                tokens[:, t + 1] = given[:, t + 1] if given is not None else _sample(out[contract.LOGITS], rng)
            tick(t + 1)
    return H, tokens


class SpilledHessians:
    """Calibration inputs per tensor on disk; H = X^T X (float32) formed when asked, one at a time.

    get/pop/`in`/len as on the dict of H matrices this replaces. Rows are appended per step and
    grouped per `_FLUSH` steps; H sums X^T X over each group's rows in order, the float32 matrix the
    in-memory accumulation gave. Files live beside the
    active TensorStore's (or in a temporary directory) and are deleted on pop and when dropped.
    """

    def __init__(self) -> None:
        store = active()
        self._tmp = tempfile.TemporaryDirectory(prefix="calib-", dir=None if store is None else store.dir)
        self.dir = Path(self._tmp.name)
        self.blocks: dict[str, list[list[tuple[int, int]]]] = {}  # name -> groups of (rows, K), file order
        self.files: dict[str, Path] = {}  # tensor names hold '/': numbered files
        self._open: set[str] = set()  # names whose last group is open
        self._last: tuple[str | None, np.ndarray | None] = (None, None)

    def append(self, name: str, X: np.ndarray, end_group: bool = True) -> None:
        X = np.ascontiguousarray(X, np.float32)
        groups = self.blocks.setdefault(name, [])
        path = self.files.setdefault(name, self.dir / f"{len(self.files)}.f32")
        with open(path, "ab") as f:
            f.write(memoryview(X.reshape(-1).view(np.uint8)))
        if name not in self._open:
            groups.append([])
            self._open.add(name)
        groups[-1].append(X.shape)
        if end_group:
            self._open.discard(name)

    def __contains__(self, name: str) -> bool:
        return name in self.blocks and self.blocks[name] is not None

    def __len__(self) -> int:
        return sum(1 for v in self.blocks.values() if v is not None)

    def get(self, name: str, default=None):
        if name not in self:
            return default
        if self._last[0] == name:
            return self._last[1]
        H = None
        with open(self.files[name], "rb") as f:
            for group in self.blocks[name]:
                X = np.concatenate([np.fromfile(f, np.float32, r * k).reshape(r, k) for r, k in group], 0)
                H = X.T @ X if H is None else H + X.T @ X
        self._last = (name, H)
        return H

    def pop(self, name: str, default=None):
        H = self.get(name, default)
        if name in self:
            self.files[name].unlink(missing_ok=True)
            self.blocks[name] = None
            self._last = (None, None)
        return H


def _sample(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(logits[:, -1]) (temperature 1, inverse CDF)."""
    z = logits[:, -1, :].astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    cdf = np.cumsum(p, -1)
    u = rng.random(z.shape[0])[:, None] * cdf[:, -1:]
    return np.minimum((cdf < u).sum(-1), z.shape[-1] - 1)
