"""Latency and memory of one artifact at one setting, measured inside a fresh worker process.

Protocol (per setting: batch B, prompt length T, D decode steps, R repeats):
  - session creation is timed once (the process is fresh, the file cache is warm);
  - one warm-up prefill and WARMUP_STEPS decode steps run first and are not counted;
  - each repeat: prefill B x T tokens from the zero state (timed), then D single-token decode
    steps carrying the state (each timed; through Session.stepper, as `generate` decodes); the
    repeat's p50/p95 are taken over its D steps;
  - reported: the median over repeats of prefill time and of the per-repeat p50 and p95.
`rwkv-opt bench` runs this with R = 1 in each of its rounds (one fresh process per round) and
takes the median over rounds (runner.run), so each repeat also re-creates the session.
A decode step makes one token for each of the B sequences, so ms/token per sequence = ms/step.
Peak RSS is the process's VmHWM after the timed runs (imports included; `rss_before_mb` is
the resident size after imports and before the session, so the session's share can be read off).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time

import numpy as np

WARMUP_STEPS = 3


def _status_mb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_now_mb() -> float:
    """Current resident set size of this process (Linux /proc; NaN elsewhere)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size of this process image.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the process that forked us,
    so a worker started by a large parent (pytest, a driver holding weights) would report the
    parent's size. VmHWM belongs to the current address space and starts fresh at exec.
    """
    hwm = _status_mb("VmHWM")
    return hwm if hwm == hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_1m() -> float:
    return os.getloadavg()[0]


def parse_nvidia_smi(text: str, pid: int) -> float:
    """MiB used by `pid` in `nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`."""
    total = 0.0
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            total += float(parts[1])
    return total if total else float("nan")


def gpu_mem_mb(provider: str) -> float:
    """GPU memory this process holds, where there is a GPU and nvidia-smi to ask; NaN otherwise."""
    if provider == "cpu" or shutil.which("nvidia-smi") is None:
        return float("nan")
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return float("nan")
    return parse_nvidia_smi(out, os.getpid())


def _decode_steps(session, state, tokens: np.ndarray) -> tuple[list[float], dict]:
    """Each column of `tokens` one timed step, through `Session.stepper` as `rwkv-opt generate` decodes (its
    first step runs unbound, at `forward`'s speed; the rest reuse their buffers)."""
    stepper, times = session.stepper(state), []
    for t in range(tokens.shape[1]):
        t0 = time.perf_counter()
        stepper.step(tokens[:, t : t + 1])
        times.append(time.perf_counter() - t0)
    return times, stepper.state


def measure(session, batch: int, prompt_len: int, decode: int, repeat: int, seed: int = 0) -> dict:
    """Time prefill and decode on `session` (a runtime.Session); returns the latency columns."""
    vocab = session.config.vocab
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, vocab, (batch, prompt_len), dtype=np.int64)
    steps = rng.integers(0, vocab, (batch, max(decode, WARMUP_STEPS)), dtype=np.int64)
    _, st = session.forward(prompt)  # warm-up, not counted
    _decode_steps(session, st, steps[:, :WARMUP_STEPS])
    prefill, p50, p95 = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        _, st = session.forward(prompt)
        prefill.append(time.perf_counter() - t0)
        if decode:
            times, _ = _decode_steps(session, st, steps[:, :decode])
            p50.append(float(np.percentile(times, 50)))
            p95.append(float(np.percentile(times, 95)))
    pre = float(np.median(prefill))
    d50 = float(np.median(p50)) if p50 else float("nan")
    return {
        "prefill_ms": pre * 1e3,
        "prefill_tok_s": batch * prompt_len / pre,
        "decode_ms_p50": d50 * 1e3,
        "decode_ms_p95": float(np.median(p95)) * 1e3 if p95 else float("nan"),
        "decode_tok_s": batch / d50 if p50 else float("nan"),
    }
