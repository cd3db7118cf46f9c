"""The fused step (backward + clip + AdamW in one ORT call) and what training does.

- the in-graph AdamW with global-norm clipping and decoupled weight decay equals a numpy AdamW
  fed the graph's own raw gradients, for two steps;
- SFT memorises a short text (loss falls by >= 80%);
- REINFORCE raises the probability of positively rewarded tokens and lowers that of negatively
  rewarded ones (measured with the float64 numpy reference on the trained weights);
- trainable subsets leave every other tensor bit-identical.
"""

import json

import numpy as np
import pytest

from rwkv_opt.errors import RwkvOptError
from rwkv_opt.training import (
    Objective,
    TrainConfig,
    Trainer,
    TrainShape,
    build_grad_graph,
    build_loss_graph,
    build_step_graph,
    select_trainable,
)
from rwkv_opt.training.data import Batch, all_batches, read_jsonl, windows
from rwkv_opt.training.step import decays, m_name, v_name
from rwkv_testutil import ort_session
from train_helpers import token_logp, weights_from_params

TEXT = "The quick brown fox jumps over the lazy dog."


def test_adamw_with_clipping_matches_numpy(tiny7):
    lg = build_loss_graph(tiny7, Objective.SFT, TrainShape(2, 10))
    trainable = select_trainable("last:1,head.weight,emb.weight", list(lg.params), 2)
    grad_sess = ort_session(build_grad_graph(lg, trainable))
    step = build_step_graph(lg, trainable)
    step_sess = ort_session(step.model)
    rng = np.random.default_rng(1)
    data = {"x": rng.integers(1, 1024, (2, 10)), "mask": np.ones((2, 10), np.int64)}
    hp = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-3, weight_decay=0.1, max_grad_norm=0.5)
    p = {k: lg.params[k] for k in trainable}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(a) for k, a in p.items()}
    state = {**p, **{m_name(k): m[k] for k in p}, **{v_name(k): v[k] for k in p}}
    for t in (1, 2):
        g = dict(zip([o.name for o in grad_sess.get_outputs()], grad_sess.run(None, {**data, **p})))
        norm = np.sqrt(sum(float((g[f"grad/{k}"].astype(np.float64) ** 2).sum()) for k in p))
        assert norm > hp["max_grad_norm"], "the check must exercise clipping"
        c = min(1.0, hp["max_grad_norm"] / (norm + 1e-6))
        want = {}
        for k in p:
            gk = g[f"grad/{k}"].astype(np.float64) * c
            m[k] = hp["beta1"] * m[k] + (1 - hp["beta1"]) * gk
            v[k] = hp["beta2"] * v[k] + (1 - hp["beta2"]) * gk * gk
            upd = (m[k] / (1 - hp["beta1"] ** t)) / (np.sqrt(v[k] / (1 - hp["beta2"] ** t)) + hp["eps"])
            if decays(k, p[k].shape):
                upd = upd + hp["weight_decay"] * p[k]
            want[k] = p[k] - hp["lr"] * upd
        scalars = {k: np.array(val, np.float32) for k, val in {**hp, "step": t}.items()}
        out = dict(zip([o.name for o in step_sess.get_outputs()], step_sess.run(None, {**data, **state, **scalars})))
        assert abs(out["grad_norm"] - norm) <= 1e-5 * norm
        for k in p:
            assert np.allclose(out[f"{k}.next"], want[k], rtol=1e-5, atol=1e-7), k
            assert np.allclose(out[f"{m_name(k)}.next"], m[k], rtol=1e-4, atol=1e-5 * np.abs(m[k]).max()), k
            assert not np.array_equal(out[f"{k}.next"], p[k])
        state = {name: out[nxt] for name, nxt in step.state.items()}
        p = {k: state[k] for k in p}
        m = {k: state[m_name(k)].astype(np.float64) for k in p}
        v = {k: state[v_name(k)].astype(np.float64) for k in p}


def test_sft_memorises_a_short_text(tiny7, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    wins = windows(read_jsonl(tmp_path / "d.jsonl", Objective.SFT, 1024), 48)
    assert len(wins) == 1 and wins[0].mask.sum() == len(TEXT.encode())
    batch = all_batches(wins, 1, 48)
    tr = Trainer(tiny7, TrainConfig(seq=48, lr=3e-3))
    before = tr.evaluate(batch)
    losses = [tr.step(batch[0]).loss for _ in range(40)]
    after = tr.evaluate(batch)
    assert losses[0] == pytest.approx(before, rel=1e-5)
    assert after <= 0.2 * before, (before, after)
    print(f"SFT memorisation: eval loss {before:.3f} -> {after:.2e} in 40 steps")


def test_reinforce_moves_probabilities_both_ways(tiny7, tmp_path):
    rows = [
        {"prompt": "Q: ", "segments": [{"text": "yes indeed", "reward": 1.0}, {"text": " no way", "reward": -1.0}]},
        {"text": "maybe not", "reward": -0.5},
        {"text": "sure", "rewards": [1.0, 0.5, 0.5, 1.0]},
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    wins = windows(read_jsonl(tmp_path / "r.jsonl", Objective.REINFORCE, 1024), 24)
    batch = all_batches(wins, 3, 24)[0]
    tr = Trainer(tiny7, TrainConfig(objective=Objective.REINFORCE, batch=3, seq=24, lr=2e-4))
    for _ in range(4):
        tr.step(batch)
    before = token_logp(tiny7, batch.x)
    after = token_logp(weights_from_params(tr.params(), tiny7), batch.x)
    target = batch.mask[:, 1:] == 1
    r = batch.reward[:, 1:]
    delta = after - before
    pos, neg = delta[target & (r > 0)], delta[target & (r < 0)]
    assert pos.size >= 10 and neg.size >= 10
    assert pos.mean() > 0 and (pos > 0).mean() >= 0.8, pos
    assert neg.mean() < 0 and (neg < 0).mean() >= 0.8, neg
    print(
        f"REINFORCE: mean dlogp {pos.mean():+.3f} on {pos.size} rewarded tokens, "
        f"{neg.mean():+.3f} on {neg.size} penalised tokens"
    )


def test_trainable_subset_leaves_the_rest_untouched(tiny7):
    tr = Trainer(tiny7, TrainConfig(seq=16, lr=1e-2, trainable="lora"))
    assert set(tr.trainable) == {
        k for k in tr.names if k.split(".")[-1] in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
    }
    before = tr.params()
    rng = np.random.default_rng(0)
    b = Batch(rng.integers(1, 1024, (1, 16)), np.ones((1, 16), np.int64), np.zeros((1, 16), np.float32))
    for _ in range(3):
        tr.step(b)
    after = tr.params()
    for k in tr.names:
        same = np.array_equal(before[k], after[k])
        assert same != (k in tr.trainable), k


def test_trainable_selectors():
    names = [f"blocks.{i}.{n}" for i in range(4) for n in ("att.w1", "att.key.weight", "ln1.weight")] + [
        "emb.weight",
        "head.weight",
    ]
    assert select_trainable("all", names, 4) == names
    assert select_trainable("lora", names, 4) == [f"blocks.{i}.att.w1" for i in range(4)]
    assert select_trainable("last:1", names, 4) == [n for n in names if n.startswith("blocks.3.")]
    assert select_trainable("all,!emb.weight,!blocks.*.ln1.*", names, 4) == [
        n for n in names if n != "emb.weight" and "ln1" not in n
    ]
    for bad, words in (
        ("blocks.9.*", "matches no parameter"),
        ("last:x", "block count"),
        ("last:5", "1..4"),
        ("lora,!lora", "leaves no parameter"),
    ):
        with pytest.raises(RwkvOptError, match=words):
            select_trainable(bad, names, 4)
