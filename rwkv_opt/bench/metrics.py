"""Accuracy metrics of model logits against reference logits (both (..., V))."""
from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """max|err|/std(ref), mean KL(ref || got) in nats, top-1 agreement."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"logits shapes differ: reference {ref.shape} vs model {got.shape}")
    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    finite = np.isfinite(got).all()
    return {
        "max_rel_err": float(np.abs(ref - got).max() / ref.std()) if finite else float("inf"),
        "mean_kl": float(kl.mean()) if finite else float("inf"),
        "top1": float((ref.argmax(-1) == got.argmax(-1)).mean()),
    }


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(ref - np.asarray(got, np.float64)).max() / max(ref.std(), 1e-30))
