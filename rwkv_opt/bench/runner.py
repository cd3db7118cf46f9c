"""`run(...)`: every artifact x provider x batch x prompt length, measured in fresh worker processes.

Everything that can be refused is refused before any measuring: a missing or foreign directory,
an execution provider this onnxruntime lacks, a bf16 artifact on the CPU EP, and (with accuracy
on) a checkpoint the reference cannot load. Progress goes to stderr, one line per job.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

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


def run_worker(job: dict) -> dict:
    """Run one job in `python -m rwkv_opt.bench.worker`; its output and errors go to our stderr."""
    with tempfile.TemporaryDirectory(prefix="rwkv-opt-bench-") as tmp:
        jp, rp = Path(tmp) / "job.json", Path(tmp) / "result.json"
        jp.write_text(json.dumps(job))
        rc = subprocess.run([sys.executable, "-m", "rwkv_opt.bench.worker", str(jp), str(rp)],
                            stdout=sys.stderr, stdin=subprocess.DEVNULL).returncode
        if rc != 0 or not rp.is_file():
            raise RwkvOptError(f"the {job['kind']} worker for {job['artifact']} failed (exit code {rc}); "
                               "its error is printed above.")
        res = json.loads(rp.read_text())
    if "error" in res:
        raise RwkvOptError(res["error"])
    return res


def _identity(info: ArtifactInfo, provider: Provider) -> dict:
    note = ""
    if info.target_provider != provider.value:
        note = f"built for {info.target_provider}, measured on {provider.value}"
    return {"artifact": info.name, "path": str(info.path), "target": info.target,
            "target_provider": info.target_provider, "provider": provider.value, "precision": info.precision,
            "quantization": info.quantization, "logits": info.logits, "n_layer": info.config["n_layer"],
            "n_embd": info.config["n_embd"], "vocab": info.config["vocab"], "size_mb": info.size_bytes / 2**20,
            "note": note}


def _profile_records(base: dict, prof: dict) -> list[dict]:
    out = []
    for phase in ("prefill", "decode"):
        for kind, key in (("op", "op_ms"), ("block", "block_ms")):
            total = sum(prof[phase][key].values()) or 1.0
            for group, ms in sorted(prof[phase][key].items(), key=lambda kv: -kv[1]):
                out.append({**base, "phase": phase, "kind": kind, "group": group, "ms": ms, "share": ms / total})
    return out


def _latency_row(info, provider, batch, prompt_len, decode, repeat, threads, seed) -> tuple[dict, dict]:
    res = run_worker({"kind": "latency", "artifact": str(info.path), "provider": provider.value, "threads": threads,
                      "batch": batch, "prompt_len": prompt_len, "decode": decode, "repeat": repeat, "seed": seed})
    prof = res.pop("profile")
    row = {**_identity(info, provider), **res, "batch": batch, "prompt_len": prompt_len, "decode_steps": decode,
           "repeat": repeat, "threads": threads or 0, "nodes_on_provider": prof["nodes_on_provider"],
           "time_on_provider": prof["time_on_provider"], "cpu_fallback": prof["cpu_fallback"],
           "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if row["cpu_fallback"]:
        row["note"] = "; ".join(x for x in (row["note"], "silent CPU fallback") if x)
    return row, prof


def _accuracy(info, provider, settings, threads, drift_tokens, seed, checkpoint) -> dict:
    res = run_worker({"kind": "accuracy", "artifact": str(info.path), "provider": provider.value,
                      "threads": threads, "checkpoint": str(checkpoint) if checkpoint else None,
                      "settings": settings, "drift_tokens": drift_tokens, "seed": seed})
    return {(r["batch"], r["prompt_len"]): r for r in res["results"]}


def _settings_line(row: dict) -> str:
    return (f"prefill {row['prefill_tok_s']:.0f} tok/s, decode {row['decode_ms_p50']:.2f} ms p50 / "
            f"{row['decode_ms_p95']:.2f} p95, peak RSS {row['peak_rss_mb']:.0f} MiB, "
            f"load {row['load_1m_start']:.2f}")


def run(artifacts: Iterable[str | Path], providers: Sequence[str | Provider] = ("cpu",), batches=(1,),
        prompt_lens=(128,), decode: int = 128, repeat: int = 3, threads: int | None = None, accuracy: bool = True,
        profile: bool = False, *, drift_tokens: int = 1024, seed: int = 0, checkpoint: str | Path | None = None,
        progress: Progress = _stderr) -> pd.DataFrame:
    """Benchmark each artifact on each provider at each (batch, prompt length); see report.SCHEMA.

    With profile=True the per-op-type and per-block times are in `df.attrs["profile"]` (a DataFrame
    with report.PROFILE_COLUMNS)."""
    infos = [artifact_info(a) for a in artifacts]
    provs = [parse_provider(p) for p in providers]
    if not infos or not provs or not batches or not prompt_lens:
        raise RwkvOptError("bench needs at least one artifact, provider, batch size and prompt length.")
    if min(batches) < 1 or min(prompt_lens) < 1 or decode < 1 or repeat < 1 or drift_tokens < 0:
        raise RwkvOptError("batch sizes, prompt lengths, --decode and --repeat must be >= 1 (--drift-tokens >= 0).")
    for info in infos:
        for p in provs:
            refuse_unrunnable(info, p)
        if accuracy:
            check_source(info, checkpoint)
    settings = [(b, t) for b in batches for t in prompt_lens]
    n_jobs, k, rows, prof_records = len(infos) * len(provs) * (len(settings) + bool(accuracy)), 0, [], []
    for info in infos:
        for p in provs:
            acc = {}
            if accuracy:
                k += 1
                progress(f"[{k}/{n_jobs}] {info.name} ({info.target}) on {p.value}: accuracy vs fp32 numpy reference, "
                         f"{len(settings)} setting(s), {drift_tokens} teacher-forced decode steps each")
                acc = _accuracy(info, p, settings, threads, drift_tokens, seed, checkpoint)
            for b, t in settings:
                k += 1
                progress(f"[{k}/{n_jobs}] {info.name} ({info.target}) on {p.value}: B={b} T={t} latency, "
                         f"{repeat} repeats of prefill + {decode} decode steps")
                row, prof = _latency_row(info, p, b, t, decode, repeat, threads, seed)
                a = acc.get((b, t), {})
                row.update({key: a.get(key, float("nan")) for key in _ACC_KEYS})
                row.update(acc_positions=a.get("positions"), drift_tokens=drift_tokens if a else None)
                progress(f"      {_settings_line(row)}" + (f", max|err|/std {a['max_rel_err']:.2e}" if a else ""))
                rows.append(row)
                if profile:
                    base = {"artifact": info.name, "target": info.target, "provider": p.value, "batch": b,
                            "prompt_len": t}
                    prof_records += _profile_records(base, prof)
    df = frame(rows)
    if profile:
        df.attrs["profile"] = profile_frame(prof_records)
    return df
