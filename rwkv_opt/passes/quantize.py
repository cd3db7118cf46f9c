"""quantize: weight-only quantization of the big projections (and optionally the embeddings).

before -> after (per matched node; its name, inputs and output tensor names are kept):
    MatMul(x, W_KN)                 -> MatMulNBits(x, B, scales[, zero_points])   scheme nbits4 / nbits8
                                       (com.microsoft; block-wise along K, accuracy_level 4 = int8
                                       activations per block at run time)
                                    -> DynamicQuantizeMatMul(x, W_int8, scale_N)  scheme int8
                                       (per-column symmetric int8 weights, activations quantized
                                       to uint8 per tensor at run time)
    Gather(table_VC, ids)           -> GatherBlockQuantized(table_q, ids, scales[, zero_points])
                                       when `embedding` is nbits8 / nbits4 (blocks along C)

Which nodes: top-level MatMuls whose right operand is a 2-D float initializer and Gathers (axis 0)
of 2-D float initializers, whose node name matches an `include` glob and no `exclude` glob
(fnmatch: `*` also crosses `/`). The defaults keep in float what is small or fragile: the
decay path (/att/decay/), everything under /wkv/ (subgraphs are never entered anyway), and the
LoRA pairs /att/a/, /att/gate/, /att/v_mix/ and DeepEmbed's s1/s2. `overrides` give a scheme (and
optionally a block size) per glob, first match wins, for MatMuls and tables alike (e.g. keep the
head at 8 bits: (("/head/*", "nbits8"),); the embedding at 8 bits, block 128: (("/emb", "nbits8", 128),)).

Constraints, refused in requires(): a model already quantized; 8-bit MatMulNBits without
accuracy_level 4 (measured ~30x slower than fp32 on ORT's CPU EP: the trap); DynamicQuantizeMatMul
on fp16 weights (float32 kernels only); a block size that is not a power of 2 >= 16. Algorithms
(see _quant_core): rtn, gptq (calibrated, see _quant_calib); int8 layers and embeddings are never
calibrated (they take rtn under gptq too). Zero points are always integers: float zero points
send MatMulNBits down a path measured 30-150x slower on the CPU EP.
"""

from __future__ import annotations

import enum
import fnmatch
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from rwkv_opt.graph.contract import Key
from rwkv_opt.artifact import initializer_bytes
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.passes import _quant_core as qc
from rwkv_opt.passes._quant_calib import Calibration, hessians
from rwkv_opt.graph.contract import Scope as S
from rwkv_opt.graph.contract import scope_path
from rwkv_opt.onnx_util import names_read
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
from rwkv_opt.progress import phase, tick
from rwkv_opt.tensorstore import make_tensor, read_array

QUANT_OPS = frozenset(
    {
        "MatMulNBits",
        "DynamicQuantizeMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "GatherBlockQuantized",
        "DynamicQuantizeLinear",
        "QuantizeLinear",
        "DequantizeLinear",
        "QLinearMatMul",
        "MatMulBnb4",
    }
)
META_KEY = Key.QUANTIZATION


class Scheme(str, enum.Enum):
    FLOAT = "float"  # leave the node as it is
    INT8 = "int8"  # DynamicQuantizeMatMul: int8 per-column weights, dynamic uint8 activations
    NBITS8 = "nbits8"  # MatMulNBits bits=8 (embeddings: GatherBlockQuantized bits=8)
    NBITS4 = "nbits4"  # MatMulNBits bits=4 (embeddings: GatherBlockQuantized bits=4)

    @property
    def bits(self) -> int:
        return {"int8": 8, "nbits8": 8, "nbits4": 4}.get(self.value, 32)


class Algorithm(str, enum.Enum):
    RTN = "rtn"  # round to nearest
    GPTQ = "gptq"  # Hessian-compensated rounding from calibration activations


# The time-mix LoRAs (decay, a, gate, v_mix): small GEMVs, yet 17% of the weight bytes a cpu-int4 decode
# step reads while they stay fp32 (reports/decode.md); the WKV; DeepEmbed's small s1/s2 MatMuls.
LORA_GLOBS = tuple(f"*{scope_path(S.ATT, s)}*" for s in (S.DECAY, S.A, S.GATE, S.V_MIX))
WKV_GLOB = f"*{scope_path(S.WKV)}*"
DEEPEMBED_GLOB = f"*{scope_path(S.DEEPEMBED)}MatMul*"
# Left in float by default: the LoRAs (the decay path among them), the WKV, DeepEmbed's s1/s2.
DEFAULT_EXCLUDE = (*LORA_GLOBS, WKV_GLOB, DEEPEMBED_GLOB)


@dataclass(frozen=True)
class Rule:
    """Node names matching `glob` take `scheme` (and `block_size`, when set) instead of the defaults."""

    glob: str
    scheme: Scheme
    block_size: int | None = None


@dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    scheme: Scheme = Scheme.NBITS4  # matched MatMuls without an override
    block_size: int = 128  # MatMulNBits / GatherBlockQuantized block along K (C)
    symmetric: bool = False  # nbits: no zero points (asymmetric measured more accurate)
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fast); 0 = float
    algorithm: Algorithm = Algorithm.RTN  # rtn | gptq (nbits MatMuls)
    include: tuple[str, ...] = ("*",)  # node-name globs to consider
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE  # node-name globs left in float
    overrides: tuple[Rule, ...] = ()  # first match wins; (glob, scheme[, block_size]) tuples accepted
    embedding: Scheme = Scheme.FLOAT  # token tables (emb, DeepEmbed s_emb) without an override
    calibration_text: str = ""  # gptq: UTF-8 text file; empty: sample from the model itself
    calibration_sequences: int = 16  # gptq: sequences (batch)
    calibration_length: int = 256  # gptq: tokens per sequence
    calibration_seed: int = 0
    gptq_damp: float = 0.1  # gptq: diagonal damping, fraction of mean(diag H) (0.1 beat
    # 0.01 on held-out tokens for the heavy-tailed FFN-value input)

    def __post_init__(self):
        try:
            for k, typ in {"scheme": Scheme, "algorithm": Algorithm, "embedding": Scheme}.items():
                object.__setattr__(self, k, typ(getattr(self, k)))
            object.__setattr__(self, "include", tuple(self.include))
            object.__setattr__(self, "exclude", tuple(self.exclude))
            object.__setattr__(
                self,
                "overrides",
                tuple(
                    r if isinstance(r, Rule) else Rule(str(r[0]), Scheme(r[1]), *(int(b) for b in r[2:3]))
                    for r in self.overrides
                ),
            )
        except ValueError as e:
            raise RwkvOptError(
                f"quantize: {e}; schemes: {', '.join(s.value for s in Scheme)}, "
                f"algorithms: {', '.join(a.value for a in Algorithm)}."
            ) from None

    def resolve(self, node_name: str, table: bool = False) -> tuple[Scheme, int]:
        """(scheme, block size) for a MatMul, or for a token table (Gather) when `table`.

        Tables default to `embedding` and skip int8 rules (DynamicQuantizeMatMul is a MatMul).
        """
        if not any(fnmatch.fnmatchcase(node_name, g) for g in self.include) or any(
            fnmatch.fnmatchcase(node_name, g) for g in self.exclude
        ):
            return Scheme.FLOAT, self.block_size
        for r in self.overrides:
            if fnmatch.fnmatchcase(node_name, r.glob) and not (table and r.scheme is Scheme.INT8):
                return r.scheme, r.block_size or self.block_size
        return (self.embedding if table else self.scheme), self.block_size

    def problem(self) -> str | None:
        """Why this config cannot make a good model, or None."""
        for b in {self.block_size} | {r.block_size for r in self.overrides if r.block_size}:
            if b < 16 or b & (b - 1):
                return f"block_size {b} must be a power of 2 >= 16 (MatMulNBits / GatherBlockQuantized)"
        if self.accuracy_level not in range(5):
            return f"accuracy_level {self.accuracy_level} must be 0..4"
        used = {self.scheme} | {r.scheme for r in self.overrides}
        if Scheme.NBITS8 in used and self.accuracy_level != 4:
            return (
                "8-bit MatMulNBits without accuracy_level=4 runs ~30x slower than fp32 on ORT's CPU EP; "
                "set accuracy_level=4 or use scheme 'int8' (DynamicQuantizeMatMul)"
            )
        if self.embedding is Scheme.INT8:
            return "embedding takes float, nbits8 or nbits4 (GatherBlockQuantized), not int8"
        return None


@dataclass
class _Job:
    index: int
    node: onnx.NodeProto
    scheme: Scheme
    block: int
    stem: str  # name prefix of the initializers this job adds
    tensor: onnx.TensorProto  # the float initializer (an external reference under a TensorStore)
    dtype: np.dtype  # the initializer's dtype (= activation dtype)
    weight: np.ndarray | None = None  # (K, N) or (V, C) float32, read when its turn comes, then dropped


@register
class Quantize(Pass):
    name = "quantize"
    Config = QuantizeConfig
    description = "weight-only MatMulNBits (int4/int8) or DynamicQuantizeMatMul (int8) on matched projections"

    def requires(self, model: onnx.ModelProto) -> str | None:
        if self.name in applied_passes(model) or any(n.op_type in QUANT_OPS for n in model.graph.node):
            return "the model is already quantized; quantize the float model once"
        inits = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:
            w = inits.get(n.input[1]) if n.op_type == "MatMul" else None
            if (
                w is not None
                and w.data_type != onnx.TensorProto.FLOAT
                and self.config.resolve(n.name)[0] is Scheme.INT8
            ):
                return (
                    f"{n.name}: DynamicQuantizeMatMul has float32 kernels only and this weight is "
                    f"{onnx.TensorProto.DataType.Name(w.data_type)}; use nbits8/nbits4 here"
                )
        return None

    def run(self, model: onnx.ModelProto) -> PassResult:
        cfg = self.config
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        bytes_before = initializer_bytes(out)
        mm, gathers = self._plan(g)
        if not mm and not gathers:
            return PassResult(model, False, ["no MatMul or Gather matched the include/exclude patterns"])
        notes = []
        H = {}
        if cfg.algorithm is Algorithm.GPTQ and any(j.scheme in (Scheme.NBITS4, Scheme.NBITS8) for j in mm):
            H, toks = self._calibrate(model, mm)
            src = f"text {cfg.calibration_text}" if cfg.calibration_text else "sequences sampled from the model"
            notes.append(f"gptq calibration: {toks.shape[0]} x {toks.shape[1]} tokens ({src}), {len(H)} input tensors")
        with phase(f"quantize ({cfg.algorithm.value})", len(mm) + len(gathers), "matrices"):
            new_inits, err_num, err_den = self._rewrite(g, mm, gathers, H)
        g.initializer.extend(new_inits)
        _drop_unused_initializers(g)
        if not any(o.domain == qc.MS_DOMAIN for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(qc.MS_DOMAIN, 1))
        counts = Counter(j.scheme.value for j in mm)
        summary = {
            "algorithm": cfg.algorithm.value,
            "block_size": cfg.block_size,
            "symmetric": cfg.symmetric,
            "accuracy_level": cfg.accuracy_level,
            "matmuls": dict(sorted(counts.items())),
            "overrides": [[r.glob, r.scheme.value, r.block_size or cfg.block_size] for r in cfg.overrides],
            "embeddings": {j.node.name: f"{j.scheme.value}/b{j.block}" for j in gathers},
            "weight_rel_err": (err_num / err_den) ** 0.5 if err_den else 0.0,
        }
        set_meta(out, META_KEY, json.dumps(summary))
        mark_applied(out, self.name)
        float_weights = {t.name for t in g.initializer}
        left = [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in float_weights]
        notes += [
            f"matmuls quantized: {dict(sorted(counts.items()))}; left float: {len(left)}",
            f"embeddings quantized: {len(gathers)}",
            f"relative weight error ||W_q - W|| / ||W||: {summary['weight_rel_err']:.4f}",
            f"weights {bytes_before / 2**20:.1f} MiB -> {initializer_bytes(out) / 2**20:.1f} MiB",
        ]
        return PassResult(out, True, notes)

    def _rewrite(self, g: onnx.GraphProto, mm: list[_Job], gathers: list[_Job], H: dict):
        """Quantize each job, one weight in memory at a time -> (new initializers, ||W_q - W||^2, ||W||^2)."""
        new_inits: list[onnx.TensorProto] = []
        err_num, err_den = 0.0, 0.0
        for k, job in enumerate(mm):
            job.weight = read_array(job.tensor).astype(np.float32)
            node, inits, deq = self._matmul(
                job, H.pop(job.node.input[0], None) if _last_use(job, mm) else H.get(job.node.input[0])
            )
            g.node[job.index].CopyFrom(node)
            new_inits += inits
            err_num += float(np.square(deq - job.weight).sum())
            err_den += float(np.square(job.weight).sum())
            job.weight = None  # free the float copy as we go
            tick(k + 1)
        for k, job in enumerate(gathers):
            job.weight = read_array(job.tensor).astype(np.float32)
            node, inits = self._gather(job)
            job.weight = None
            g.node[job.index].CopyFrom(node)
            new_inits += inits
            tick(len(mm) + k + 1)
        return new_inits, err_num, err_den

    # ---- planning ------------------------------------------------------------------------------
    def _plan(self, g: onnx.GraphProto) -> tuple[list[_Job], list[_Job]]:
        cfg = self.config
        inits = {t.name: t for t in g.initializer}
        readers = Counter(i for n in g.node for i in n.input if i in inits)
        floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        mm, gathers = [], []
        for i, n in enumerate(g.node):
            if n.op_type == "MatMul":
                w, (scheme, block) = inits.get(n.input[1]), cfg.resolve(n.name)
            elif n.op_type == "Gather" and all(a.name != "axis" or a.i == 0 for a in n.attribute):
                w, (scheme, block) = inits.get(n.input[0]), cfg.resolve(n.name, table=True)
            else:
                continue
            if w is None or len(w.dims) != 2 or w.data_type not in floats or scheme is Scheme.FLOAT:
                continue
            if n.op_type == "Gather" and w.dims[1] % block:
                continue  # GatherBlockQuantized blocks must tile a row exactly
            # a weight read by several nodes is quantized per node (GPTQ's H is per input), so the
            # new initializers are then named after the node as well
            stem = w.name if readers[w.name] == 1 else f"{w.name}@{n.name}"
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(w.data_type))
            job = _Job(i, n, scheme, block, stem, w, dtype)  # weights are read one at a time in run()
            (mm if n.op_type == "MatMul" else gathers).append(job)
        return mm, gathers

    def _calibrate(self, model: onnx.ModelProto, jobs: list[_Job]):
        cfg = self.config
        vocab = int(get_meta(model, Key.VOCAB) or 0)
        if not vocab:
            raise RwkvOptError(
                "quantize: gptq needs the model's vocabulary size (rwkv_opt.vocab metadata); "
                "build the model with rwkv-opt."
            )
        tensors = sorted({j.node.input[0] for j in jobs if j.scheme in (Scheme.NBITS4, Scheme.NBITS8)})
        cal = Calibration(cfg.calibration_text, cfg.calibration_sequences, cfg.calibration_length, cfg.calibration_seed)
        return hessians(model, tensors, vocab, cal)

    # ---- rewriting -----------------------------------------------------------------------------
    def _quantize_blocks(self, job: _Job, h: np.ndarray | None) -> qc.BlockQuant:
        cfg, bits = self.config, job.scheme.bits
        if cfg.algorithm is Algorithm.GPTQ and h is not None:
            return qc.gptq(job.weight, h, bits, job.block, cfg.symmetric, cfg.gptq_damp)
        return qc.rtn(job.weight, bits, job.block, cfg.symmetric)

    def _matmul(self, job: _Job, h: np.ndarray | None):
        n = job.node
        if job.scheme is Scheme.INT8:
            return qc.dynamic_int8_node(n.name, n.input[0], n.output[0], job.stem, job.weight)
        bq = self._quantize_blocks(job, h)
        node, inits = qc.matmul_nbits_node(
            n.name, n.input[0], n.output[0], job.stem, bq, self.config.accuracy_level, scale_dtype=job.dtype
        )
        return node, inits, bq.dequantize()

    def _gather(self, job: _Job):
        cfg, n = self.config, job.node
        bits = job.scheme.bits
        bq = qc.rtn(job.weight.T, bits, job.block, cfg.symmetric)  # blocks along C, per row
        q = bq.q.T  # (V, C)
        data = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8) if bits == 4 else q.astype(np.uint8)
        name = job.stem
        inits = [
            make_tensor(np.ascontiguousarray(data), f"{name}.q{bits}"),
            make_tensor(np.ascontiguousarray(bq.s.T.astype(job.dtype)), f"{name}.scales"),
        ]
        ins = [inits[0].name, n.input[1], inits[1].name]
        if bq.z is not None:
            z = bq.z.T.astype(np.uint8)
            if bits == 4:
                z = np.concatenate([z, np.zeros((z.shape[0], z.shape[1] % 2), np.uint8)], 1)
                z = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
            inits.append(make_tensor(np.ascontiguousarray(z), f"{name}.zero_points"))
            ins.append(inits[2].name)
        node = helper.make_node(
            "GatherBlockQuantized",
            ins,
            list(n.output),
            name=n.name,
            domain=qc.MS_DOMAIN,
            bits=bits,
            block_size=job.block,
            gather_axis=0,
            quantize_axis=1,
        )
        return node, inits


def _last_use(job: _Job, jobs: list[_Job]) -> bool:
    """True when no later job reads the same input tensor (its H can then be freed)."""
    later = jobs[jobs.index(job) + 1 :]
    return all(j.node.input[0] != job.node.input[0] for j in later)


def _drop_unused_initializers(g: onnx.GraphProto) -> None:
    used = names_read(g)
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name not in used:
            del g.initializer[i]
