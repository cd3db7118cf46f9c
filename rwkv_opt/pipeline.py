"""Run a target's passes over the base graph, check the model after each, verify, write the artifact.

    weights -> base fp32 graph -> [passes of the target, + heads] -> artifact dir -> verify
Each pass is checked with onnx.checker afterwards; the manifest records, per pass, its config,
time, node count, op histogram before/after, size and whether it changed anything.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from rwkv_opt.artifact import MODEL_FILE, Manifest, artifact_size, initializer_bytes, save_model

from rwkv_opt.outdir import staging_dir
from rwkv_opt.artifact import versions  # noqa: F401  (its old home; bench and users import it from here)
from rwkv_opt.checkpoint.weights import Weights
from rwkv_opt.config import Precision, Provider
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph.model import BuildOptions, LogitsMode, build_model
from rwkv_opt.passes.base import get_pass
from rwkv_opt.progress import available_memory, peak_rss_bytes, phase, release_freed_memory, set_sink, stderr_line
from rwkv_opt.targets import TOP1_ALPHA, Target
from rwkv_opt.tensorstore import active, has_external, scratch_store

Progress = Callable[[str], None]
EMULATE_MAX_PARAMS = 20_000_000  # bf16 graphs are checked through onnx.reference up to this size
VERIFY_TOKENS = (16, 32)  # prompt + decoded tokens verify compares: 33 positions
EMULATED_VERIFY_TOKENS = (8, 8)  # bf16 under onnx.reference (~100x slower than ORT): 9 positions
# near-flat logits: the reference's median top-1 probability under this (the synthetic 0.1B's is under 3%,
# a 0.1B trained here 9% on held-out text; targets.py)
FLAT_TOP1_PROB = 0.05


def check_onnx(model: onnx.ModelProto | Path, where: str) -> None:
    """onnx.checker full check; a weightless model (its weights in the active TensorStore) is checked
    from a file beside them, which costs no weight bytes; an in-memory model over 1 GiB is checked
    from its saved file instead."""
    if isinstance(model, onnx.ModelProto) and has_external(model) and active() is not None:
        path = active().session_path(model, "check.onnx")
        try:
            return check_onnx(path, where)
        finally:
            path.unlink()
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


check = check_onnx  # the old name; 'check' also names Pass preconditions and `rwkv-opt check`


def run_passes(
    model: onnx.ModelProto, passes, progress: Progress = stderr_line, after_pass=None
) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Apply (name, config overrides) passes in order; check requires and validity after each;
    `after_pass(model)` is called with each result (the pipeline frees replaced weights there)."""
    records = []
    for name, overrides in passes:
        p = get_pass(name).configure(overrides)
        before = Counter(n.op_type for n in model.graph.node)
        t0 = time.perf_counter()
        res = p(model)
        dt = time.perf_counter() - t0
        check_onnx(res.model, f"pass '{name}'")
        after = Counter(n.op_type for n in res.model.graph.node)
        rec = PassRecord(
            name,
            p.config_dict(),
            round(dt, 3),
            sum(before.values()),
            sum(after.values()),
            dict(sorted(before.items())),
            dict(sorted(after.items())),
            initializer_bytes(res.model),
            res.changed,
            list(res.notes),
        )
        records.append(rec)
        progress(
            f"  pass {name:<22} {dt:6.2f}s  nodes {rec.nodes_before} -> {rec.nodes_after}"
            f"{'' if res.changed else '  (no change)'}"
        )
        model = res.model
        if after_pass is not None:
            after_pass(model)
    return model, records


def verify(
    artifact: Path,
    weights: Weights,
    target: Target,
    prompt_len: int = VERIFY_TOKENS[0],
    decode_len: int = VERIFY_TOKENS[1],
    logits: LogitsMode = LogitsMode.LAST,
    blocks: int | None = None,
) -> dict:
    """Teacher-forced accuracy vs the fp32 numpy reference, on the CPU EP where it can run, over a
    sequence the reference samples itself (16 prompt + 32 decoded tokens: 33 positions; 8 + 8 under
    the slow GPU-like emulation).

    The two models never share the memory: the reference runs first (its converted layers kept while
    they fit, streamed from the checkpoint beyond that) and records its logits, then it is dropped and
    the artifact runs in a low-memory ORT session (no prepacked weight copies, no arena, external data
    mapped from the file). `blocks` < n_layer verifies only the embedding, the first `blocks` blocks and
    the head (graph/truncate.py): what fits when the whole model does not."""
    import gc

    from rwkv_opt.bench.accuracy import compare_recorded, reference_record
    from rwkv_opt.reference import ReferenceModel
    from rwkv_opt.runtime import Session

    emulate = target.precision is Precision.BF16  # ORT's CPU EP has no bf16 kernels: emulate a GPU EP
    if emulate:
        if weights.config.n_params() > EMULATE_MAX_PARAMS:
            return {
                "status": "skipped",
                "skipped": "ORT's CPU EP has no bf16 kernels and the model is too large to emulate; "
                "verify on a CUDA machine with `rwkv-opt check`",
            }
        prompt_len, decode_len = verify_tokens(target)
    why = f"{prompt_len} + {decode_len} tokens" + (
        ": ORT's CPU EP has no bf16 kernels, so the bf16 graph runs in "
        "onnx.reference with GPU-like rounding, about 100x slower than ORT"
        if emulate
        else ""
    )
    # a fifth of the free memory stays free: the page cache feeds the layers converted again per token
    cache = max(0, int(0.8 * available_memory()) - _ref_reserve(weights.config))
    ref = ReferenceModel(weights, np.float32, cache_bytes=cache)
    n_layer = weights.config.n_layer
    blocks = n_layer if blocks is None else blocks
    if blocks < n_layer:
        ref.cfg = dataclasses.replace(ref.cfg, n_layer=blocks)
        ref.layers.n = blocks
    with phase("verify: reference", prompt_len + decode_len, "tokens"):
        rec = reference_record(ref, prompt_len + decode_len, prompt_len, all_prompt=logits is LogitsMode.ALL)
    ref_top1_prob = float(np.median(_softmax_max(rec["logits"])))
    del ref
    weights.drop_cache()
    gc.collect()
    release_freed_memory()
    if emulate:
        from rwkv_opt.runtime.evaluator import EvaluatorSession

        sess, provider = EvaluatorSession(artifact), "onnx.reference (GPU-like rounding)"
    else:
        path = Path(artifact)
        if blocks < n_layer:  # beside model.onnx, so it reads the same model.onnx.data
            from rwkv_opt.graph.truncate import truncate

            path = path.with_name(f".verify-{blocks}-blocks.onnx")
            onnx.save_model(truncate(onnx.load(str(artifact), load_external_data=False), blocks), str(path))
        try:
            with phase("verify: start the ORT session"):
                # int8 twins as a default Session runs a 4-bit artifact (graph/int8_twins.py)
                sess, provider = Session(path, Provider.CPU, low_memory=True, int8_twins=True), "cpu"
        finally:
            if path != Path(artifact):
                path.unlink(missing_ok=True)
    with phase("verify: artifact", decode_len + 1, "calls"):
        m = compare_recorded(sess, rec)
    del sess
    if blocks < n_layer:
        m["blocks_verified"] = blocks
        m["scope"] = (
            f"embedding, blocks 0-{blocks - 1} of {n_layer} and the head (the whole model's ORT CPU "
            "session does not fit in memory); blocks past it passed the graph checks only"
        )
    m["misses"] = target.budget.failures(m["top1"], m["positions"], m["max_rel_err"], m["mean_kl"])
    m["within_budget"] = not m["misses"]
    m["status"] = "passed" if m["within_budget"] else "failed"
    m["top1_p_value"] = target.budget.top1_p_value(round(m["top1"] * m["positions"]), m["positions"])
    m["provider"] = provider
    first = "every prompt position" if logits is LogitsMode.ALL else "the prompt's last position"
    m["protocol"] = (
        f"{m['positions']} teacher-forced positions ({first} and each decode step) of a sequence "
        f"the reference samples itself, {why}"
    )
    m["reference_top1_prob_median"] = round(ref_top1_prob, 4)
    return m


def verify_tokens(target: Target) -> tuple[int, int]:
    """(prompt, decoded) tokens verify compares for `target` (positions: decoded + 1): fewer for bf16,
    which runs emulated in onnx.reference."""
    return EMULATED_VERIFY_TOKENS if target.precision is Precision.BF16 else VERIFY_TOKENS


def _softmax_max(logits: np.ndarray) -> np.ndarray:
    """The top-1 probability at each position of (..., V) logits."""
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return 1.0 / np.exp(z).sum(-1)


def _ref_reserve(cfg) -> int:
    """Memory the reference needs beside its layer cache: the embedding and head in fp32, a layer being
    converted, activations, and headroom for the interpreter and ORT's later start."""
    return 2 * cfg.vocab * cfg.n_embd * 4 + 3 * _layer_bytes(cfg) + (1 << 30)


def _layer_bytes(cfg) -> int:
    return (cfg.n_params() - 2 * cfg.vocab * cfg.n_embd) * 4 // max(cfg.n_layer, 1)


def memory_plan(cfg, target: Target, artifact_bytes: int) -> dict:
    """What `pipeline` will hold at its peak, per phase, from the config alone (bytes).

    build/passes: one tensor at a time (the largest, in fp32, a few times over) plus GPTQ's calibration
    session, which maps the fp32 weights; verify: the reference's minimum (embedding, head, a layer)
    and the artifact's session (its weights mapped from the file; fp16 weights folded to fp32 copies
    at load, so the fp32 bytes)."""
    largest = cfg.vocab * cfg.n_embd * 4
    fp32 = cfg.n_params() * 4
    calib = fp32 if _gptq_config(target) else 0
    overhead = 600 << 20
    # ORT's CPU EP has no fp16 MatMul: it casts fp16 weights to fp32 once at session start (constant
    # folding; measured at 1.5B: 5.6 GiB anonymous for a 2.85 GiB artifact). Without folding the casts
    # run per call and, scheduled together, peaked higher still (7.1 GiB).
    session = fp32 if target.precision in (Precision.FP16_MIXED, Precision.FP16, Precision.BF16) else artifact_bytes
    if target.quantization != "none":  # the float parts left are the small ones
        session = 2 * artifact_bytes
    return {
        "passes": max(4 * largest, calib) + overhead,
        "passes_gptq": bool(calib),
        "verify_reference": _ref_reserve(cfg),
        "verify_session": session + 2 * largest + overhead,
        "verify_session_weights": session,
    }


def verify_blocks(cfg, target: Target, plan: dict, avail: int) -> int:
    """How many blocks (with the embedding and head) the artifact's verification session can hold."""
    if plan["verify_session"] <= avail:
        return cfg.n_layer
    weights = plan["verify_session_weights"]
    fixed = weights * (2 * cfg.vocab * cfg.n_embd) / max(cfg.n_params(), 1)  # the embedding and head's share
    per_block = (weights - fixed) / cfg.n_layer
    room = avail - (plan["verify_session"] - weights) - fixed  # less activations and overhead
    return max(0, min(cfg.n_layer - 1, int(room // max(per_block, 1))))


def _gptq_config(target: Target):
    """The target's quantize config when it runs GPTQ (which calibrates), else None."""
    for name, overrides in target.passes:
        if name == "quantize":
            cfg = get_pass(name).configure(overrides).config
            return cfg if cfg.algorithm.value == "gptq" else None
    return None


def estimated_artifact_bytes(cfg, target: Target) -> int:
    fp32 = cfg.n_params() * 4
    if target.quantization != "none":
        return int(fp32 * 0.2)
    return fp32 if target.precision is Precision.FP32 else fp32 // 2


GPTQ_AUTO_MAX_PARAMS = 1_600_000_000  # above: RTN unless asked (GPTQ's time grows as K^2 N, see reports/scale.md)
# fp16 targets calibrate through ORT's CPU EP, which folds the fp16 weights into fp32 copies beside the
# mapped fp16 ones (1.5x the fp32 bytes): past this size that breaks the 1.25x memory goal
GPTQ_AUTO_MAX_PARAMS_FP16 = 500_000_000


def choose_quant_algorithm(target: Target, n_params: int, requested: str = "auto") -> tuple[Target, dict | None]:
    """The target with its quantize pass's algorithm settled -> (target, manifest record or None)."""
    q = [c for n, c in target.passes if n == "quantize"]
    if not q:
        return target, None
    own = str(q[0].get("algorithm", "rtn"))
    if requested == "auto":
        limit = GPTQ_AUTO_MAX_PARAMS if target.precision is Precision.FP32 else GPTQ_AUTO_MAX_PARAMS_FP16
        chosen = "rtn" if own == "gptq" and n_params > limit else own
        cost = (
            "GPTQ's calibration and Hessian solves would take longer than the rest of the pipeline"
            if limit == GPTQ_AUTO_MAX_PARAMS
            else "GPTQ's calibration on the CPU EP would hold the fp16 weights and their fp32 casts (1.5x fp32)"
        )
        why = (
            (
                f"auto: {n_params / 1e9:.2f}B parameters > {limit / 1e9:.1f}B, where {cost}; RTN (pass "
                "--quant-algorithm gptq to insist)"
            )
            if chosen != own
            else f"auto: the target's own ({own})"
        )
    elif requested in ("gptq", "rtn"):
        chosen, why = requested, "asked for (--quant-algorithm)"
    else:
        raise RwkvOptError(f"unknown quantization algorithm '{requested}'; choose auto, gptq or rtn.")
    passes = tuple((n, {**c, "algorithm": chosen}) if n == "quantize" else (n, c) for n, c in target.passes)
    return dataclasses.replace(target, passes=passes), {"chosen": chosen, "target_default": own, "why": why}


@dataclasses.dataclass
class _Run:
    """One pipeline run's settings, shared by its stages."""

    target: Target
    weights: Weights
    heads: tuple
    logits: LogitsMode
    progress: Progress
    quant_choice: dict | None
    plan: dict
    phases: dict = dataclasses.field(default_factory=dict)


def run_pipeline(
    target: Target,
    weights: Weights,
    out: Path,
    *,
    heads=(),
    logits: LogitsMode | None = None,
    do_verify: bool = True,
    progress: Progress = stderr_line,
    quant_algorithm: str = "auto",
    keep_unverified: bool = False,
) -> dict:
    """Build, optimize and verify `target`'s artifact into `out`.

    An artifact that misses its budget is refused (RwkvOptError naming the next steps; nothing is
    written), or with `keep_unverified` written with manifest "verification": {"status": "failed", ...}.
    The model is saved into a staging directory and becomes `out` only after that decision."""
    t_start = time.perf_counter()
    cfg = weights.config
    target, quant_choice = choose_quant_algorithm(target, cfg.n_params(), quant_algorithm)
    if quant_choice and quant_choice["chosen"] != quant_choice["target_default"]:
        progress(f"[i] quantization: {quant_choice['chosen']} ({quant_choice['why']})")
    for name, _ in list(target.passes) + list(heads):
        get_pass(name)  # an unknown pass or head is refused before any work
    plan = memory_plan(cfg, target, estimated_artifact_bytes(cfg, target))
    _check_memory(cfg, target, plan, do_verify)
    _check_room(cfg, target, Path(out))
    run = _Run(target, weights, tuple(heads), logits or target.logits, progress, quant_choice, plan)
    with set_sink(progress), staging_dir(out) as tmp:
        manifest = _build_and_save(run, tmp)
        if do_verify:
            _verify_stage(run, tmp, manifest, keep_unverified)
        else:
            manifest.verification = _skipped_verification(plan)
        manifest.extra.update(
            phase_seconds={k: round(v, 3) for k, v in run.phases.items()},
            peak_rss_bytes=peak_rss_bytes(),
            total_seconds=round(time.perf_counter() - t_start, 3),
        )
        manifest.write(tmp)
    progress(f"wrote artifact {out}")
    m = manifest.to_dict()
    progress(f"done in {m['total_seconds']:.1f}s, peak memory (RSS) {m['peak_rss_bytes'] / 2**30:.2f} GiB")
    return m


def _build_and_save(run: _Run, tmp: Path) -> Manifest:
    """Stages 1-3: the base graph, the target's passes and heads, model.onnx (+ .data) in `tmp`, checked.
    Weights live in a scratch store beside it meanwhile (tensorstore.py). -> the manifest so far."""
    cfg, progress, phases = run.weights.config, run.progress, run.phases
    with scratch_store(tmp) as store:
        progress(
            f"[1/4] build base fp32 graph ({cfg.n_layer} layers, C={cfg.n_embd}, V={cfg.vocab}, {cfg.variant.value})"
        )
        t0 = time.perf_counter()
        with phase("build", cfg.n_layer, "layers"):
            model = build_model(run.weights, BuildOptions(logits=run.logits))
        run.weights.drop_cache()
        check_onnx(model, "build")
        t_build = phases["build"] = time.perf_counter() - t0
        progress(
            f"      {len(model.graph.node)} nodes, {initializer_bytes(model) / 2**20:.1f} MiB of weights, "
            f"{t_build:.1f}s"
        )
        progress(f"[2/4] passes for target {run.target.name}")
        t0 = time.perf_counter()
        model, records = run_passes(
            model, list(run.target.passes) + list(run.heads), progress, after_pass=store.release_unreferenced
        )  # the disk holds what is live
        phases["passes"] = time.perf_counter() - t0
        manifest = _manifest(run, records, t_build)
        progress("[3/4] save the model to a staging directory (it becomes the artifact once verified)")
        t0 = time.perf_counter()
        with phase("save"):
            save_model(model, tmp / MODEL_FILE, consume=True)
        del model
    with phase("onnx.checker"):
        check_onnx(tmp / MODEL_FILE, "saving")
    phases["write"] = time.perf_counter() - t0
    manifest.extra["artifact_bytes"] = artifact_size(tmp)
    progress(f"      {manifest.extra['artifact_bytes'] / 2**20:.1f} MiB, {phases['write']:.1f}s")
    return manifest


def _manifest(run: _Run, records, t_build: float) -> Manifest:
    t = run.target
    return Manifest(
        target=t.name,
        provider=t.provider.value,
        precision=t.precision.value,
        quantization=t.quantization,
        logits=run.logits.value,
        source=run.weights.manifest_source(),
        passes=[r.__dict__ for r in records],
        heads=[h for h, _ in run.heads],
        extra={
            "build_seconds": round(t_build, 3),
            **({"quantization_algorithm": run.quant_choice} if run.quant_choice else {}),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )


def _verify_stage(run: _Run, tmp: Path, manifest: Manifest, keep_unverified: bool) -> None:
    """Stage 4: verify the staged artifact; a miss is refused (nothing is written) unless `keep_unverified`."""
    cfg, target, progress = run.weights.config, run.target, run.progress
    progress("[4/4] verify against the numpy reference (prompt, then teacher-forced decode steps)")
    t0 = time.perf_counter()
    blocks = verify_blocks(cfg, target, run.plan, available_memory())
    if blocks < cfg.n_layer:
        progress(
            f"      the whole model's ORT CPU session needs about {run.plan['verify_session'] / 2**30:.1f} GiB: "
            f"verifying the embedding, blocks 0-{blocks - 1} of {cfg.n_layer} and the head"
        )
    v = manifest.verification = verify(tmp / MODEL_FILE, run.weights, target, logits=run.logits, blocks=blocks)
    run.phases["verify"] = time.perf_counter() - t0
    if v["status"] == "failed":
        if not keep_unverified:
            raise RwkvOptError(refusal(target, v, run.weights))
        v["kept"] = "--keep-unverified: written although it missed its budget"
        progress(
            f"WARNING: {target.name} missed its accuracy budget ({'; '.join(v['misses'])}); kept "
            'because of --keep-unverified, marked "verification": {"status": "failed"} in '
            "its manifest"
        )


def _skipped_verification(plan: dict) -> dict:
    fits = plan["verify_session"] <= available_memory()
    return {
        "status": "skipped",
        "skipped": "--no-verify: no logits were compared; the graph checks ran (onnx.checker after each "
        "pass, the fp32 WKV state path)"
        + (
            ""
            if fits
            else f"; verifying would need about {plan['verify_session'] / 2**30:.1f} GiB for the "
            "artifact's ORT CPU session, more than this machine has"
        ),
    }


def refusal(target: Target, v: dict, weights: Weights) -> str:
    """The refusal of an artifact that missed its budget: what was missed and by how much, why it is
    likely, and what to do next."""
    b = target.budget
    by = []
    hits = round(v["top1"] * v["positions"])
    if any(m.startswith("top-1") for m in v["misses"]):
        by.append(
            f"top-1 {hits}/{v['positions']} = {v['top1']:.1%} against a {b.min_top1:.0%} budget "
            f"(p = {v['top1_p_value']:.2g} < {TOP1_ALPHA} in the one-sided binomial test)"
        )
    if not v["max_rel_err"] <= b.max_rel_err:
        by.append(f"max|err|/std {v['max_rel_err']:.2e} > {b.max_rel_err}{_times(v['max_rel_err'], b.max_rel_err)}")
    if not v["mean_kl"] <= b.max_kl:
        by.append(f"mean KL {v['mean_kl']:.2e} > {b.max_kl}{_times(v['mean_kl'], b.max_kl)}")
    prob = v.get("reference_top1_prob_median", 1.0)
    why = ""
    synthetic = weights.source.startswith("synthetic")
    if synthetic or prob < FLAT_TOP1_PROB:
        what = "a synthetic checkpoint (random weights)" if synthetic else "this checkpoint"
        why = (
            f" Likely cause: {what} has near-flat logits (the reference's median top-1 probability is "
            f"{prob:.1%}), so near-tied tokens swap under small weight errors; a trained model's are sharper."
        )
    return (
        f"target {target.name} missed its accuracy budget on {v['positions']} teacher-forced positions: "
        f"{'; '.join(by)}; nothing was written.{why} Next: use a trained checkpoint (--checkpoint "
        "RWKV-x070-World-0.1B.pth), or skip the check with --no-verify, or keep this artifact marked "
        'unverified with --keep-unverified (manifest "verification": {"status": "failed"}).'
    )


def _times(value: float, limit: float) -> str:
    """' (5.3x)': how far over a positive limit a value is."""
    return f" ({value / limit:.1f}x)" if limit > 0 else ""


def _check_memory(cfg, target: Target, plan: dict, do_verify: bool) -> None:
    """Refuse up front, before any work, when a phase cannot fit in the memory available."""
    avail = available_memory()
    size = f"this {cfg.n_params() / 1e9:.1f}B-parameter model"
    if plan["passes"] > avail:
        gptq = plan["passes_gptq"]
        raise RwkvOptError(
            f"building {target.name} for {size} needs about {plan['passes'] / 2**30:.1f} GiB"
            f"{' (GPTQ calibration runs the fp32 model)' if gptq else ''} and {avail / 2**30:.1f} GiB "
            f"is available; {'pass --quant-algorithm rtn, or ' if gptq else ''}use a machine with "
            "more memory."
        )
    if do_verify and verify_blocks(cfg, target, plan, avail) == 0:
        raise RwkvOptError(
            f"verifying {target.name} on {size} needs about {plan['verify_session'] / 2**30:.1f} GiB "
            f"for the artifact's ORT CPU session (not even its embedding, first block and head "
            f"fit) and {avail / 2**30:.1f} GiB is available; pass "
            "--no-verify to write it unverified (the manifest says so), choose a quantized target "
            "(cpu-int4), or use a machine with more memory."
        )


def _check_room(cfg, target: Target, out: Path) -> None:
    """Refuse up front when the disk cannot hold the scratch weights and the artifact."""
    import shutil

    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    # the fp32 scratch, plus what the weight-changing passes write while their inputs still live (each
    # pass's replaced tensors are released after it, and the artifact is moved out of the scratch file)
    fp32 = cfg.n_params() * 4
    need = (
        fp32
        + (fp32 // 2 if target.precision is not Precision.FP32 else 0)
        + (estimated_artifact_bytes(cfg, target) if target.quantization != "none" else 0)
    )
    if (q := _gptq_config(target)) is not None:  # its spilled calibration inputs
        need += (
            q.calibration_sequences
            * q.calibration_length
            * (cfg.n_layer * (6 * cfg.n_embd + cfg.dim_ffn) + cfg.n_embd)
            * 4
        )
    free = shutil.disk_usage(parent).free
    if need > free:
        raise RwkvOptError(
            f"building {target.name} for this {cfg.n_params() / 1e9:.1f}B-parameter model needs about "
            f"{need / 2**30:.1f} GiB of disk beside {out} and {free / 2**30:.1f} GiB is free; "
            "free some space or write the artifact to a larger disk (-o)."
        )
