"""Gradients of the ONNX training graph (graph_grad's plain-op backward, our embedding scatter)
against central finite differences of the float64 numpy reference, on the tiny models.

For every tensor kind (parameter name without its block number: emb.weight, blocks.0.ln0.*,
ln1/ln2/ln_x, the six token-shift mixes, w0/a0/v0, k_k, k_a, r_k, the four LoRA pairs, the
four attention Linears, ffn key/value/x_k, DeepEmbed s_emb/s_emb_x/s0/s1/s2, ln_out, head)
the first tensor of that kind is checked at its largest-gradient entry and two random entries.
Tolerance: |g_onnx - g_fd| <= 1e-3 * max(|g_fd|, 1e-2 * max|g_onnx of the tensor|)
(the ONNX graph is fp32; the finite differences are fp64 with h = 1e-5).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rwkv_opt.checkpoint.synth import synthetic_state_dict
from rwkv_opt.checkpoint.weights import from_state_dict
from rwkv_opt.training import Objective, TrainShape, build_grad_graph, build_loss_graph, checkpoint_layout
from rwkv_testutil import ort_session

RTOL, FLOOR, H = 1e-3, 1e-2, 1e-5
B, T = 2, 12


def kind(key: str) -> str:
    return re.sub(r"^blocks\.\d+\.", "", key)


def finite_differences(params, like, x, mask, reward, probes, tmp: Path) -> dict:
    """fd_worker.py on the checkpoint-layout float64 weights; probes are (key, flat index)."""
    sd = checkpoint_layout(params, like, np.float64)
    extra = {} if reward is None else {"reward": reward}
    np.savez(
        tmp / "fd_in.npz",
        x=x,
        mask=mask,
        h=H,
        probe_keys=np.array([k for k, _ in probes]),
        probe_index=np.array([i for _, i in probes]),
        **extra,
        **{f"sd/{k}": v for k, v in sd.items()},
    )
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "fd_worker.py"), str(tmp / "fd_in.npz"), str(tmp / "fd_out.npz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(np.load(tmp / "fd_out.npz"))


def batch(vocab):
    rng = np.random.default_rng(3)
    x = rng.integers(1, vocab, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[0, :3] = 0  # a prompt: context only
    mask[1, 9:] = 0  # pads
    x[1, 9:] = 0
    reward = rng.choice([-1.0, 0.5, 2.0], (B, T)).astype(np.float32)
    return x, mask, reward


@pytest.mark.parametrize(
    "deepembed, objective",
    [(False, Objective.SFT), (False, Objective.REINFORCE), (True, Objective.SFT)],
    ids=["rwkv7-sft", "rwkv7-reinforce", "rwkv7a-sft"],
)
def test_gradients_match_finite_differences(deepembed, objective, tmp_path):
    """(REINFORCE differs from SFT only in the loss weights, so DeepEmbed is checked with SFT alone.)"""
    tiny_weights = from_state_dict(synthetic_state_dict("tiny", deepembed=deepembed, seed=7).materialize())
    lg = build_loss_graph(tiny_weights, objective, TrainShape(B, T))
    sess = ort_session(build_grad_graph(lg, list(lg.params)))
    x, mask, reward = batch(tiny_weights.config.vocab)
    feeds = {"x": x, "mask": mask, **({"reward": reward} if objective is Objective.REINFORCE else {}), **lg.params}
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))

    seen, rng = {}, np.random.default_rng(0)
    for key in lg.params:
        seen.setdefault(kind(key), key)
    assert len(seen) >= (44 if tiny_weights.config.deepembed else 39)
    probes = []
    for key in seen.values():
        g = out[f"grad/{key}"]
        assert g.shape == lg.params[key].shape and np.isfinite(g).all()
        probes += [(key, i) for i in [int(np.abs(g).argmax())] + [int(i) for i in rng.integers(0, g.size, 2)]]
    ref = finite_differences(
        lg.params, tiny_weights, x, mask, reward if objective is Objective.REINFORCE else None, probes, tmp_path
    )
    assert abs(out["loss"] - ref["loss"]) <= 1e-5 * max(1.0, abs(float(ref["loss"])))
    worst = 0.0
    for (key, fi), fd in zip(probes, ref["fd"]):
        g = out[f"grad/{key}"]
        onnx_g = float(g.reshape(-1)[fi])
        err = abs(onnx_g - fd) / max(abs(fd), FLOOR * float(np.abs(g).max()))
        worst = max(worst, err)
        assert err <= RTOL, f"{key}[{np.unravel_index(fi, g.shape)}]: onnx {onnx_g:.6g} vs finite difference {fd:.6g}"
    print(f"{objective.value} {tiny_weights.config.variant.value}: {len(seen)} kinds, worst scaled error {worst:.2e}")
