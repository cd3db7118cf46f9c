"""The training tests' loss, defined independently in float64 numpy (also used by fd_worker.py)."""

from __future__ import annotations

import numpy as np

from rwkv_opt.checkpoint.weights import Weights, from_state_dict
from rwkv_opt.reference import ReferenceModel
from rwkv_opt.training.graph import checkpoint_layout


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def token_logp(weights: Weights, x: np.ndarray) -> np.ndarray:
    """log p(x[b, t+1] | x[b, <=t]) from the numpy reference, (B, T-1), float64."""
    logits, _ = ReferenceModel(weights, np.float64).forward(x)
    return np.take_along_axis(log_softmax(logits)[:, :-1], x[:, 1:, None], -1)[..., 0]


def reference_loss(weights: Weights, x, mask, reward=None) -> float:
    """The training loss (reports/training.md, "Design"): masked mean next-token NLL, or reward-weighted
    (REINFORCE), float64."""
    nll = -token_logp(weights, x)
    wt = mask[:, 1:].astype(np.float64)
    weight = wt if reward is None else wt * reward[:, 1:]
    return float((nll * weight).sum() / max(wt.sum(), 1.0))


def weights_from_params(params: dict, like: Weights, dtype=np.float64) -> Weights:
    """A Weights object (checkpoint layout, `dtype`) holding training-layout `params`."""
    return from_state_dict(checkpoint_layout(params, like, dtype))
