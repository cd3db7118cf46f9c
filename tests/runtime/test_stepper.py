"""Session.stepper: one-token steps over IOBinding ping-pong buffers give exactly Session.forward's results."""

import numpy as np
import pytest

from rwkv_opt.errors import RwkvOptError
from rwkv_opt.pipeline import run_pipeline
from rwkv_opt.runtime import Session
from rwkv_opt.targets import get_target

quiet = dict(do_verify=False, progress=lambda s: None)


@pytest.fixture(scope="module", params=["cpu-fp32", "cpu-int8"])
def artifact(request, tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("stepper") / request.param
    run_pipeline(get_target(request.param), tiny_weights, out, **quiet)
    return out


def test_steps_are_forward_bitwise(artifact):
    """From a prompt's state, batch 2: every step's outputs and the final state equal forward's bit for bit
    (7 and 7a, fp32 and int8); the steps after the first run bound (no per-step allocation)."""
    s = Session(artifact)
    rng = np.random.default_rng(0)
    _, st = s.forward(rng.integers(0, 1024, (2, 9)))
    given = {k: v.copy() for k, v in st.items()}
    stepper = s.stepper(st)
    ref = st
    for t in range(5):
        tok = rng.integers(0, 1024, (2, 1))
        want, ref = s.forward(tok, ref)
        got = stepper.step(tok)
        assert np.array_equal(got["head"], want), t
    assert stepper._sets is not None  # bound after the first step
    state = stepper.state
    assert all(np.array_equal(state[k], ref[k]) for k in ref) and set(state) == set(ref)
    assert all(np.array_equal(st[k], given[k]) for k in st)  # the state given was copied, not written
    state[next(iter(state))][...] = 7.0  # a copy: the stepper goes on unchanged
    tok = rng.integers(0, 1024, (2, 1))
    assert np.array_equal(stepper.step(tok)["head"], s.forward(tok, ref)[0])


def test_stepper_refuses_prompts_and_wrong_state(artifact):
    s = Session(artifact)
    with pytest.raises(RwkvOptError, match="one token per row"):
        s.stepper().step(np.zeros((1, 3), np.int64))
    with pytest.raises(RwkvOptError, match="got 3 rows but its state has batch 2"):
        s.stepper(batch=2).step(np.zeros((3, 1), np.int64))
    with pytest.raises(RwkvOptError, match="token id"):
        s.stepper().step(np.array([[10**9]]))
    assert s.stepper(batch=2).step(np.array([4, 5]))["head"].shape[0] == 2  # (batch,) is one token per row
    bad = s.zero_state(1)
    bad[next(iter(bad))] = np.zeros((1, 1, 3), np.float32)
    with pytest.raises(RwkvOptError, match="must be a float32 array of shape"):
        s.stepper(bad)


def test_sampler_head_runs_unbound_with_its_occurrence_carried(tiny7, tmp_path):
    """The sampling head's occurrence is an overridable initializer, which IOBinding cannot bind: the stepper
    runs those steps unbound, carrying the occurrence, with the results of plain runs."""
    from rwkv_opt.graph import contract
    from rwkv_opt.passes import sampling_head as head

    run_pipeline(get_target("cpu-fp32"), tiny7, tmp_path / "a", heads=[("sampling", {})], **quiet)
    s = Session(tmp_path / "a")
    occ = np.zeros((1, tiny7.config.vocab), np.float32)
    stepper = s.stepper(carry={head.OCCURRENCE_NEXT: (head.OCCURRENCE, occ)})
    state, feeds = s.zero_state(1), head.sampling_feeds(head.SamplingParams())
    for t in range(4):
        tok, u = np.array([[3 + t]]), np.array([0.25 + 0.1 * t])
        want = s.run({contract.TOKENS: tok, **state, **feeds, head.OCCURRENCE: occ, head.UNIFORM: u})
        got = stepper.step(tok, {**feeds, head.UNIFORM: u})
        assert int(got[head.TOKEN][0]) == int(want[head.TOKEN][0])
        state = {d: want[o] for o, d in contract.state_feedback(tiny7.config.n_layer).items()}
        occ = want[head.OCCURRENCE_NEXT]
    assert stepper._sets is None
    assert np.array_equal(stepper.carried(head.OCCURRENCE), occ)
