"""`run(...)`: every artifact x provider x batch x prompt length, measured in fresh worker processes.

Everything that can be refused is refused before any measuring: a missing or foreign directory,
an execution provider this onnxruntime lacks, a bf16 artifact on the CPU EP, and (with accuracy
on) a checkpoint the reference cannot load. Progress goes to stderr, one line per job.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from rwkv_opt.bench.report import frame, profile_frame
from rwkv_opt.bench.source import ArtifactInfo, artifact_info, check_source, refuse_unrunnable
from rwkv_opt.config import Provider
from rwkv_opt.errors import RwkvOptError

Progress = Callable[[str], None]
_ACC_KEYS = ("max_rel_err", "mean_kl", "top1", "state_drift")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_provider(p: str | Provider) -> Provider:
    try:
        return Provider(p)
    except ValueError:
        raise RwkvOptError(f"unknown provider '{p}'; choose from: {', '.join(x.value for x in Provider)}.") from None


# numpy's BLAS (the reference's matmuls) on one thread: a small single-token matmul split over two
# threads waits on the second one whenever the CPU is shared (ORT, other jobs), which made the 0.1B
# reference 10-15x slower per token under load. ORT keeps its own thread pool and is unaffected.
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _spawn(cmd: list[str]) -> int:
    """Run cmd with its stdout and stderr on our stderr (copied through when that is not a real file)."""
    env = {**os.environ, **WORKER_ENV}
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
        sys.stderr.write(r.stdout + r.stderr)
        return r.returncode
    return subprocess.run(cmd, stdout=sys.stderr, stdin=subprocess.DEVNULL, env=env).returncode


def run_worker(job: dict) -> dict:
    """Run one job in `python -m rwkv_opt.bench.worker`; its output and errors go to our stderr."""
    with tempfile.TemporaryDirectory(prefix="rwkv-opt-bench-") as tmp:
        jp, rp = Path(tmp) / "job.json", Path(tmp) / "result.json"
        jp.write_text(json.dumps(job))
        rc = _spawn([sys.executable, "-m", "rwkv_opt.bench.worker", str(jp), str(rp)])
        if rc != 0 or not rp.is_file():
            raise RwkvOptError(
                f"the {job['kind']} worker for {job['artifact']} failed (exit code {rc}); its error is printed above."
            )
        res = json.loads(rp.read_text())
    if "error" in res:
        raise RwkvOptError(res["error"])
    return res


def _identity(info: ArtifactInfo, provider: Provider) -> dict:
    note = ""
    if info.target_provider != provider.value:
        note = f"built for {info.target_provider}, measured on {provider.value}"
    return {
        "artifact": info.name,
        "path": str(info.path),
        "target": info.target,
        "target_provider": info.target_provider,
        "provider": provider.value,
        "precision": info.precision,
        "quantization": info.quantization,
        "logits": info.logits,
        "n_layer": info.config["n_layer"],
        "n_embd": info.config["n_embd"],
        "vocab": info.config["vocab"],
        "size_mb": info.size_bytes / 2**20,
        "note": note,
    }


def _profile_records(base: dict, prof: dict) -> list[dict]:
    out = []
    for phase in ("prefill", "decode"):
        for kind, key in (("op", "op_ms"), ("block", "block_ms")):
            total = sum(prof[phase][key].values()) or 1.0
            for group, ms in sorted(prof[phase][key].items(), key=lambda kv: -kv[1]):
                out.append({**base, "phase": phase, "kind": kind, "group": group, "ms": ms, "share": ms / total})
    return out


def _latency_round(info, provider, batch, prompt_len, decode, threads, seed, profile: bool) -> dict:
    return run_worker(
        {
            "kind": "latency",
            "artifact": str(info.path),
            "provider": provider.value,
            "threads": threads,
            "batch": batch,
            "prompt_len": prompt_len,
            "decode": decode,
            "repeat": 1,
            "seed": seed,
            "profile": profile,
        }
    )


def _aggregate(cell, rounds: list[dict], prof: dict, acc: dict, decode: int, threads, drift_tokens: int) -> dict:
    """One schema row from a cell's rounds (medians; peak RSS the max) and its accuracy figures."""
    info, provider, batch, prompt_len = cell
    med = {
        k: float(np.median([r[k] for r in rounds]))
        for k in ("prefill_ms", "decode_ms_p50", "decode_ms_p95", "session_s", "rss_before_mb")
    }
    loads = [r[k] for r in rounds for k in ("load_1m_start", "load_1m_end")]
    gpu = [r["gpu_mem_mb"] for r in rounds if r["gpu_mem_mb"] == r["gpu_mem_mb"]]  # NaN without a GPU
    row = {
        **_identity(info, provider),
        **med,
        "batch": batch,
        "prompt_len": prompt_len,
        "decode_steps": decode,
        "repeat": len(rounds),
        "threads": threads or 0,
        "prefill_tok_s": batch * prompt_len / med["prefill_ms"] * 1e3,
        "decode_tok_s": batch / med["decode_ms_p50"] * 1e3,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
        "gpu_mem_mb": max(gpu) if gpu else float("nan"),
        "load_1m_min": min(loads),
        "load_1m_max": max(loads),
        "nodes_on_provider": prof["nodes_on_provider"],
        "time_on_provider": prof["time_on_provider"],
        "cpu_fallback": prof["cpu_fallback"],
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if row["cpu_fallback"]:
        row["note"] = "; ".join(x for x in (row["note"], "silent CPU fallback") if x)
    if any(r.get("int8_twins") for r in rounds):  # what a default Session does with a 4-bit artifact
        row["note"] = "; ".join(x for x in (row["note"], "4-bit block GEMMs on int8 twins (graph/int8_twins.py)") if x)
    row.update({key: acc.get(key, float("nan")) for key in _ACC_KEYS})
    row.update(acc_positions=acc.get("positions"), drift_tokens=drift_tokens if acc else None)
    return row


def measure_accuracy(info, provider, settings, threads, drift_tokens, seed, checkpoint) -> dict:
    """Accuracy figures per (batch, prompt_len) setting, measured in a worker process."""
    res = run_worker(
        {
            "kind": "accuracy",
            "artifact": str(info.path),
            "provider": provider.value,
            "threads": threads,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "settings": settings,
            "drift_tokens": drift_tokens,
            "seed": seed,
        }
    )
    return {(r["batch"], r["prompt_len"]): r for r in res["results"]}


def _round_line(res: dict) -> str:
    return (
        f"      prefill {res['prefill_ms']:.1f} ms, decode {res['decode_ms_p50']:.2f} ms p50 / "
        f"{res['decode_ms_p95']:.2f} p95, peak RSS {res['peak_rss_mb']:.0f} MiB, load {res['load_1m_start']:.2f}"
    )


def _refuse_bad_input(infos, provs, batches, prompt_lens, decode, repeat, drift_tokens, accuracy, checkpoint) -> None:
    if not infos or not provs or not batches or not prompt_lens:
        raise RwkvOptError("bench needs at least one artifact, provider, batch size and prompt length.")
    if min(batches) < 1 or min(prompt_lens) < 1 or decode < 1 or repeat < 1 or drift_tokens < 0:
        raise RwkvOptError("batch sizes, prompt lengths, --decode and --repeat must be >= 1 (--drift-tokens >= 0).")
    for info in infos:
        for p in provs:
            refuse_unrunnable(info, p)
        if accuracy:
            check_source(info, checkpoint)


def run(
    artifacts: Iterable[str | Path],
    providers: Sequence[str | Provider] = ("cpu",),
    batches=(1,),
    prompt_lens=(128,),
    decode: int = 128,
    repeat: int = 3,
    threads: int | None = None,
    accuracy: bool = True,
    profile: bool = False,
    *,
    drift_tokens: int = 1024,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    progress: Progress = _stderr,
) -> pd.DataFrame:
    """Benchmark each artifact on each provider at each (batch, prompt length); see report.SCHEMA.

    Latency runs in `repeat` rounds; each round measures every cell (artifact x provider x setting)
    once in a fresh worker, so a change in machine load during the run hits all cells alike.
    With profile=True the per-op-type and per-block times are in `df.attrs["profile"]` (a DataFrame
    with report.PROFILE_COLUMNS)."""
    infos = [artifact_info(a) for a in artifacts]
    provs = [parse_provider(p) for p in providers]
    _refuse_bad_input(infos, provs, batches, prompt_lens, decode, repeat, drift_tokens, accuracy, checkpoint)
    settings = [(b, t) for b in batches for t in prompt_lens]
    cells = [(info, p, b, t) for info in infos for p in provs for b, t in settings]
    n_jobs, k = len(infos) * len(provs) * bool(accuracy) + len(cells) * repeat, 0
    acc: dict = {}
    for info in infos if accuracy else []:
        for p in provs:
            k += 1
            progress(
                f"[{k}/{n_jobs}] {info.name} ({info.target}) on {p.value}: accuracy vs fp32 numpy reference, "
                f"{len(settings)} setting(s), {drift_tokens} teacher-forced decode steps each"
            )
            for (b, t), a in measure_accuracy(info, p, settings, threads, drift_tokens, seed, checkpoint).items():
                acc[info.path, p, b, t] = a
                progress(
                    f"      B={b} T={t}: max|err|/std {a['max_rel_err']:.2e}, KL {a['mean_kl']:.2e}, "
                    f"top-1 {a['top1']:.4f}, state drift {a['state_drift']:.2e}"
                )
    rounds: list[list[dict]] = [[] for _ in cells]
    profs: list[dict] = [{} for _ in cells]
    for r in range(repeat):
        for i, (info, p, b, t) in enumerate(cells):
            k += 1
            progress(
                f"[{k}/{n_jobs}] round {r + 1}/{repeat}: {info.name} ({info.target}) on {p.value}, B={b} T={t}: "
                f"prefill + {decode} decode steps" + (" + profiled run" if r == 0 else "")
            )
            res = _latency_round(info, p, b, t, decode, threads, seed, profile=r == 0)
            if r == 0:
                profs[i] = res.pop("profile")
            rounds[i].append(res)
            progress(_round_line(res))
    rows = [
        _aggregate(c, rounds[i], profs[i], acc.get((c[0].path, c[1], c[2], c[3]), {}), decode, threads, drift_tokens)
        for i, c in enumerate(cells)
    ]
    df = frame(rows)
    if profile:
        df.attrs["profile"] = profile_frame(
            [
                rec
                for i, (info, p, b, t) in enumerate(cells)
                for rec in _profile_records(
                    {"artifact": info.name, "target": info.target, "provider": p.value, "batch": b, "prompt_len": t},
                    profs[i],
                )
            ]
        )
    return df
