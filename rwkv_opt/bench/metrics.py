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


def decided_flips(ref: np.ndarray, got: np.ndarray, margin: float) -> np.ndarray:
    """Reference leads (top-1 minus runner-up logit) at the positions where the model's top-1
    differs from the reference's although that lead is >= `margin`.

    A flip needs |err| at the two tokens to sum to at least the lead, so a precision whose logits
    err by up to e can flip any position led by < 2e: near-ties, whose outcome depends on the last
    bit of every fp32 sum before the rounding (BLAS kernel, SIMD math library: it differs between
    CPUs). What must hold whatever the CPU is that no position the reference decides clearly flips.
    """
    ref = np.asarray(ref, np.float64)
    top2 = np.sort(ref, -1)[..., -2:]
    lead = top2[..., 1] - top2[..., 0]
    bad = (ref.argmax(-1) != np.asarray(got).argmax(-1)) & (lead >= margin)
    return lead[bad]


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(ref - np.asarray(got, np.float64)).max() / max(ref.std(), 1e-30))


class LogitStats:
    """compare_logits over many chunks without holding them all: the same three figures.

    Long teacher-forced decodes of a 65536-way vocabulary would need gigabytes to concatenate;
    this keeps the running max|err|, the reference's mean and M2 (Chan's parallel update, so the
    std is the population std over every element, as np.std gives), the KL sum and top-1 count.
    """

    def __init__(self) -> None:
        self.n = 0  # elements seen
        self.mean = 0.0
        self.m2 = 0.0
        self.max_err = 0.0
        self.kl_sum = 0.0
        self.top1_hits = 0
        self.positions = 0
        self.finite = True

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        ref = np.asarray(ref, np.float64)
        got = np.asarray(got, np.float64)
        if ref.shape != got.shape:
            raise ValueError(f"logits shapes differ: reference {ref.shape} vs model {got.shape}")
        self.finite &= bool(np.isfinite(got).all())
        n, mean = ref.size, float(ref.mean())
        m2 = float(((ref - mean) ** 2).sum())
        delta, total = mean - self.mean, self.n + n
        self.m2 += m2 + delta * delta * self.n * n / total
        self.mean += delta * n / total
        self.n = total
        if self.finite:
            self.max_err = max(self.max_err, float(np.abs(ref - got).max()))
            lp, lq = log_softmax(ref), log_softmax(got)
            self.kl_sum += float((np.exp(lp) * (lp - lq)).sum())
        self.top1_hits += int((ref.argmax(-1) == got.argmax(-1)).sum())
        self.positions += ref.size // ref.shape[-1]

    def result(self) -> dict[str, float]:
        if not self.positions:
            raise ValueError("LogitStats.result() before any add()")
        std = (self.m2 / self.n) ** 0.5
        return {
            "max_rel_err": self.max_err / std if self.finite else float("inf"),
            "mean_kl": self.kl_sum / self.positions if self.finite else float("inf"),
            "top1": self.top1_hits / self.positions,
        }
