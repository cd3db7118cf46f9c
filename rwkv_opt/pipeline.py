"""Run a target's passes over the base graph, check the model after each, verify, write the artifact.

    weights -> base fp32 graph -> [passes of the target, + heads] -> artifact dir -> verify
Each pass is checked with onnx.checker afterwards; the manifest records, per pass, its config,
time, node count, op histogram before/after, size and whether it changed anything.
"""
from __future__ import annotations

import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from rwkv_opt import __version__
from rwkv_opt.artifact import MANIFEST_FILE, MODEL_FILE, initializer_bytes, save_model, staging_dir, write_json
from rwkv_opt.checkpoint.weights import Weights
from rwkv_opt.config import Precision, Provider
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph.model import BuildOptions, LogitsMode, build_model
from rwkv_opt.passes.base import applied_passes, get_pass
from rwkv_opt.targets import Target

Progress = Callable[[str], None]
EMULATE_MAX_PARAMS = 20_000_000  # bf16 graphs are checked through onnx.reference up to this size


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def versions() -> dict:
    import onnxruntime
    import onnxsim

    return {"rwkv_opt": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxsim": getattr(onnxsim, "__version__", "?")}


def check(model: onnx.ModelProto | Path, where: str) -> None:
    """onnx.checker full check; models over 1 GiB are checked from their saved file instead."""
    if isinstance(model, onnx.ModelProto) and initializer_bytes(model) >= (1 << 30):
        return
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model), full_check=True)
    except onnx.checker.ValidationError as e:
        raise RwkvOptError(f"the model is invalid after {where}: {str(e).splitlines()[0]}") from None


@dataclass
class PassRecord:
    name: str
    config: dict
    seconds: float
    nodes_before: int
    nodes_after: int
    ops_before: dict
    ops_after: dict
    size_bytes: int
    changed: bool
    notes: list


def run_passes(model: onnx.ModelProto, passes, progress: Progress = _stderr) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Apply (name, config overrides) passes in order; check requires and validity after each."""
    records = []
    for name, overrides in passes:
        cls = get_pass(name)
        missing = [r for r in cls.requires if r not in applied_passes(model)]
        if missing:
            raise RwkvOptError(f"pass '{name}' requires '{missing[0]}' to run first; fix the target's pass order.")
        p = cls(cls.Config(**overrides))
        before = Counter(n.op_type for n in model.graph.node)
        t0 = time.perf_counter()
        res = p(model)
        dt = time.perf_counter() - t0
        check(res.model, f"pass '{name}'")
        after = Counter(n.op_type for n in res.model.graph.node)
        rec = PassRecord(name, p.config_dict(), round(dt, 3), sum(before.values()), sum(after.values()),
                         dict(sorted(before.items())), dict(sorted(after.items())),
                         initializer_bytes(res.model), res.changed, list(res.notes))
        records.append(rec)
        progress(f"  pass {name:<22} {dt:6.2f}s  nodes {rec.nodes_before} -> {rec.nodes_after}"
                 f"{'' if res.changed else '  (no change)'}")
        model = res.model
    return model, records


def verify(artifact: Path, weights: Weights, target: Target, prompt_len: int = 16, decode_len: int = 32) -> dict:
    """Teacher-forced accuracy vs the fp32 numpy reference, on the CPU EP where it can run, over a
    sequence the reference samples itself (16 prompt + 32 decoded tokens: 33 positions; 8 + 8 under
    the slow GPU-like emulation)."""
    from rwkv_opt.bench.accuracy import model_tokens, teacher_forced
    from rwkv_opt.reference import ReferenceModel
    from rwkv_opt.runtime import Session

    if target.precision is Precision.BF16:  # ORT's CPU EP has no bf16 kernels: emulate a GPU EP
        if weights.config.n_params() > EMULATE_MAX_PARAMS:
            return {"skipped": "ORT's CPU EP has no bf16 kernels and the model is too large to emulate; "
                               "verify on a CUDA machine with `rwkv-opt check`"}
        from rwkv_opt.runtime.evaluator import EvaluatorSession

        sess, provider, prompt_len, decode_len = EvaluatorSession(artifact), "onnx.reference (GPU-like rounding)", 8, 8
    else:
        sess, provider = Session(artifact, Provider.CPU), "cpu"
    ref = ReferenceModel(weights, np.float32)
    tokens = model_tokens(ref, prompt_len + decode_len, seed=0)   # what the model itself writes
    m = teacher_forced(sess, ref, tokens, prompt_len)
    m["misses"] = target.budget.failures(m["top1"], m["positions"], m["max_rel_err"], m["mean_kl"])
    m["within_budget"] = not m["misses"]
    m["top1_p_value"] = target.budget.top1_p_value(round(m["top1"] * m["positions"]), m["positions"])
    m["provider"] = provider
    return m


def run_pipeline(target: Target, weights: Weights, out: Path, *, heads=(), logits: LogitsMode | None = None,
                 do_verify: bool = True, progress: Progress = _stderr) -> dict:
    t_start = time.perf_counter()
    logits = logits or target.logits
    for name, _ in list(target.passes) + list(heads):
        get_pass(name)  # an unknown pass or head is refused before any work
    progress(f"[1/4] build base fp32 graph ({weights.config.n_layer} layers, C={weights.config.n_embd}, "
             f"V={weights.config.vocab}, {weights.config.variant.value})")
    t0 = time.perf_counter()
    model = build_model(weights, BuildOptions(logits=logits))
    check(model, "build")
    t_build = time.perf_counter() - t0
    progress(f"      {len(model.graph.node)} nodes, {initializer_bytes(model) / 2**20:.1f} MiB of weights, {t_build:.1f}s")
    progress(f"[2/4] passes for target {target.name}")
    model, records = run_passes(model, list(target.passes) + list(heads), progress)
    manifest = {
        "tool": "rwkv-opt", "target": target.name, "provider": target.provider.value,
        "precision": target.precision.value, "quantization": target.quantization, "logits": logits.value,
        "source": {"path": weights.source, "digest": weights.digest or "synthetic", "config": weights.config.to_dict()},
        "build_seconds": round(t_build, 3),
        "passes": [r.__dict__ for r in records],
        "heads": [h for h, _ in heads],
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    progress(f"[3/4] write artifact {out}")
    with staging_dir(out) as tmp:
        save_model(model, tmp / MODEL_FILE)
        del model
        check(tmp / MODEL_FILE, "saving")
        if do_verify:
            progress("[4/4] verify against the numpy reference (prompt, then teacher-forced decode steps)")
            v = manifest["verification"] = verify(tmp / MODEL_FILE, weights, target)
            if "skipped" not in v and not v["within_budget"]:
                raise RwkvOptError(
                    f"target {target.name} missed its accuracy budget on {v['positions']} teacher-forced positions: "
                    f"{'; '.join(v['misses'])} (top1 {v['top1']:.4f}, max|err|/std {v['max_rel_err']:.2e}, KL "
                    f"{v['mean_kl']:.2e}; budget top1 >= {target.budget.min_top1}, max|err|/std <= "
                    f"{target.budget.max_rel_err}, KL <= {target.budget.max_kl}); nothing was written.")
        manifest["total_seconds"] = round(time.perf_counter() - t_start, 3)
        write_json(tmp / MANIFEST_FILE, manifest)
    return manifest
