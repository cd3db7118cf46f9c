"""Helpers shared by the tests (kept out of conftest.py so test modules can import them
by a unique name: several test folders have a conftest.py of their own)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

HERE = Path(__file__).parent


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """`rwkv-opt ARGS` in a subprocess, from the worktree (python -m), output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "rwkv_opt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        check=False,
    )


def ort_session(model, optimize: bool = True, threads: int = 2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def zero_feed(cfg, batch):
    feed = {}
    for i in range(cfg.n_layer):
        feed[f"x_tmix_last_{i}"] = np.zeros((batch, 1, cfg.n_embd), np.float32)
        feed[f"wkv_state_{i}"] = np.zeros((batch, cfg.n_head, cfg.head_size, cfg.head_size), np.float32)
        feed[f"x_cmix_last_{i}"] = np.zeros((batch, 1, cfg.n_embd), np.float32)
    return feed


def run_oracle(ckpt: Path, tokens: np.ndarray, deepembed: bool, out: Path, split: int | None = None) -> dict:
    """Run the official package in a subprocess; returns the npz contents."""
    pytest.importorskip("torch")
    pytest.importorskip("rwkv")
    np.save(out.with_suffix(".tokens.npy"), tokens)
    cmd = [
        sys.executable,
        str(HERE / "oracle_worker.py"),
        str(ckpt),
        str(out.with_suffix(".tokens.npy")),
        "1" if deepembed else "0",
        str(out),
    ] + ([str(split)] if split else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(np.load(out))
