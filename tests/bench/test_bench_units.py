"""Units under the bench: streamed logit metrics, profiler parsing, nvidia-smi parsing."""

import numpy as np
import pytest

from rwkv_opt.bench.latency import parse_nvidia_smi
from rwkv_opt.bench.metrics import LogitStats, compare_logits
from rwkv_opt.bench.placement import block_of, parse_profile, top_level


def test_logit_stats_equals_compare_logits():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3, 7, 40)) * 2 + 0.5
    got = ref + rng.normal(size=ref.shape) * 0.02
    s = LogitStats()
    s.add(ref[:, :3], got[:, :3])
    for t in range(3, 7):
        s.add(ref[:, t : t + 1], got[:, t : t + 1])
    want = compare_logits(ref, got)
    for k, v in s.result().items():
        assert v == pytest.approx(want[k], rel=1e-9)
    assert s.positions == 21


def test_logit_stats_non_finite_is_inf():
    s = LogitStats()
    s.add(np.zeros((1, 1, 4)) + [0, 1, 2, 3], np.array([[[0, np.nan, 2, 3]]]))
    assert s.result()["max_rel_err"] == float("inf") and s.result()["mean_kl"] == float("inf")


def _ev(name, ts, dur, op="Mul", provider="CPUExecutionProvider", tid=1, cat="Node"):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": {"op_name": op, "provider": provider}}


def test_profile_parsing_nests_scan_bodies_and_splits_runs():
    events = [
        _ev("model_run", 0, 100, cat="Session"),  # warm-up run: ignored
        _ev("/blocks.0/att/Mul_kernel_time", 10, 50),
        _ev("model_run", 200, 100, cat="Session"),  # measured prefill
        _ev("/blocks.0/att/wkv/Scan_kernel_time", 210, 60, op="Scan"),
        _ev("/wkv_step/MatMul_kernel_time", 220, 20, op="MatMul"),  # inside the Scan: folded
        _ev("/head/MatMul_kernel_time", 280, 20, op="MatMul", provider="CUDAExecutionProvider"),
        _ev("model_run", 400, 50, cat="Session"),  # measured decode step
        _ev("/blocks.1/ffn/MatMul_kernel_time", 410, 30, op="MatMul", provider="CUDAExecutionProvider"),
    ]
    assert len(top_level([e for e in events if e["cat"] == "Node"])) == 4
    p = parse_profile(events, "CUDAExecutionProvider", n_warm_runs=1)
    assert p["prefill"]["op_ms"] == pytest.approx({"Scan": 0.04, "MatMul": 0.04})  # exclusive times
    assert p["prefill"]["block_ms"] == {"blocks.000": 0.06, "head": 0.02}
    assert p["decode"]["block_ms"] == {"blocks.001": 0.03}
    assert p["nodes_on_provider"] == pytest.approx(2 / 3)
    assert p["time_on_provider"] == pytest.approx(50 / 110)


def test_block_names():
    assert block_of("/blocks.12/att/wkv/Scan") == "blocks.012"
    assert block_of("/head/MatMul") == "head" and block_of("Reshape_3") == "Reshape_3"


def test_nvidia_smi_parse():
    assert parse_nvidia_smi("123, 512\n456, 100\n123, 24\n", 123) == 536
    assert np.isnan(parse_nvidia_smi("", 123))


def test_decided_flips_counts_only_clear_leads():
    from rwkv_opt.bench.metrics import decided_flips

    ref = np.array([[3.0, 1.0, 0.0], [1.0, 0.98, 0.0], [0.0, 2.0, 0.5]])
    got = np.array([[1.0, 3.0, 0.0], [0.97, 0.99, 0.0], [0.0, 2.0, 0.4]])  # rows 0 and 1 flip
    assert decided_flips(ref, got, 0.5).tolist() == [2.0]  # the near-tie (lead 0.02) is excused
    assert np.allclose(decided_flips(ref, got, 0.01), [2.0, 0.02])  # unless the margin is below it
    assert decided_flips(ref, ref, 0.0).size == 0
