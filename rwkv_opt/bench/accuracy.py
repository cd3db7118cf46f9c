"""Teacher-forced accuracy of an artifact against the numpy reference on the same tokens.

Protocol: a prompt of `prompt_len` tokens as one sequence, then `decode_len` tokens fed one
at a time carrying the state (teacher forced: the same token stream for both). Logits are
compared at every decode step and at the prompt's last position (all positions when the model
emits them); the final WKV states are compared too ("state drift").
"""

from __future__ import annotations

import numpy as np

from rwkv_opt.bench.metrics import LogitStats, compare_logits, log_softmax, rel_err
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph import contract
from rwkv_opt.progress import tick
from rwkv_opt.reference import ReferenceModel
from rwkv_opt.runtime import Session


def fixed_tokens(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int64)


def model_tokens(ref: ReferenceModel, length: int, seed: int = 0) -> np.ndarray:
    """(1, length) tokens the fp32 reference writes itself: a random first token, then each next
    token drawn from softmax(logits) at temperature 1 (fixed seed, so the same weights always give
    the same sequence). On a trained model these are the positions it is used on; random tokens
    are the least predictable input it can get and make its top-1 flip between near-ties."""
    return np.asarray(_self_written(ref, length, seed, record=False)[0], np.int64)[None]


def _self_written(ref: ReferenceModel, length: int, seed: int, record: bool):
    """The reference writing `length` tokens one at a time -> (ids, logits after each fed token when
    `record` (the last token is then fed too), final state)."""
    rng = np.random.default_rng(seed)
    ids, state, logits = [int(rng.integers(ref.cfg.vocab))], None, []
    for t in range(length if record else length - 1):
        out, state = ref.forward(np.array([[ids[-1]]]), state)
        if record:
            logits.append(np.asarray(out[0, -1], np.float32))
        if t < length - 1:
            p = np.exp(log_softmax(np.asarray(out[0, -1], np.float64)))
            ids.append(int(rng.choice(p.size, p=p / p.sum())))
        tick(t + 1)
    return ids, logits, state


def _state_drift(ref_wkv: np.ndarray, state: dict) -> float:
    """max|err|/std of the artifact's final WKV states against the reference's (L, B, H, N, N)."""
    return rel_err(ref_wkv, np.stack([state[contract.state_inputs(i)[1]] for i in range(ref_wkv.shape[0])]))


def teacher_forced(session: Session, ref: ReferenceModel, tokens: np.ndarray, prompt_len: int) -> dict:
    """Run both models over `tokens` (B, prompt_len + decode_len); return the metrics dict."""
    prompt, rest = tokens[:, :prompt_len], tokens[:, prompt_len:]
    got_p, st = session.forward(prompt)
    ref_p, rst = ref.forward(prompt, full_output=got_p.shape[1] > 1)
    got, want = [got_p], [ref_p]
    for t in range(rest.shape[1]):
        g, st = session.forward(rest[:, t : t + 1], st)
        r, rst = ref.forward(rest[:, t : t + 1], rst)
        got.append(g)
        want.append(r)
    m = compare_logits(np.concatenate(want, 1), np.concatenate(got, 1).astype(np.float32))
    m["state_drift"] = _state_drift(rst.wkv, st)
    m["positions"] = int(np.concatenate(want, 1).shape[1] * tokens.shape[0])
    return m


def teacher_forced_stream(
    session: Session, ref: ReferenceModel, tokens: np.ndarray, prompt_len: int, progress=None
) -> dict:
    """teacher_forced() in bounded memory, for long decodes (e.g. 1024 steps over V = 65536).

    Same protocol and keys; logits are compared step by step (metrics.LogitStats) instead of
    being concatenated. `progress(step, total)` is called now and then when given.
    """
    prompt, rest = tokens[:, :prompt_len], tokens[:, prompt_len:]
    stats = LogitStats()
    got, st = session.forward(prompt)
    want, rst = ref.forward(prompt, full_output=got.shape[1] > 1)
    stats.add(want, got.astype(np.float32))
    for t in range(rest.shape[1]):
        got, st = session.forward(rest[:, t : t + 1], st)
        want, rst = ref.forward(rest[:, t : t + 1], rst)
        stats.add(want, got.astype(np.float32))
        if progress is not None and (t + 1) % 128 == 0:
            progress(t + 1, rest.shape[1])
    m = stats.result()
    m["state_drift"] = _state_drift(rst.wkv, st)
    m["positions"] = stats.positions
    return m


def reference_record(
    ref: ReferenceModel, length: int, prompt_len: int, seed: int = 0, all_prompt: bool = False
) -> dict:
    """One token-at-a-time pass of the reference that both writes the sequence (as model_tokens) and
    records what teacher_forced compares: its logits at the prompt's last position (every prompt
    position when `all_prompt`) and at each later token, and the final WKV state. The artifact is
    then run alone (compare_recorded), so the two models never hold their weights at the same time.
    """
    ids, logits, state = _self_written(ref, length, seed, record=True)
    first = 0 if all_prompt else prompt_len - 1
    return {
        "tokens": np.asarray(ids, np.int64)[None],
        "prompt_len": prompt_len,
        "logits": np.stack(logits[first:])[None],
        "wkv": state.wkv,
    }


def refuse_non_finite(logits: np.ndarray, who: str) -> None:
    """Verification compares numbers: NaN or inf logits are a broken model, never a figure to report."""
    bad = ~np.isfinite(logits).all(axis=-1)
    if bad.any():
        raise RwkvOptError(
            f"{who} produced non-finite logits (NaN or inf) at {int(bad.sum())} of {bad.size} "
            f"positions, the first at position {int(np.argmax(bad.reshape(-1)))}; its weights are "
            "broken, check the checkpoint for NaN/inf values."
        )


def compare_recorded(session: Session, rec: dict) -> dict:
    """teacher_forced's metrics for `session` against a reference_record; non-finite logits are refused."""
    tokens, prompt_len = rec["tokens"], rec["prompt_len"]
    got_p, st = session.forward(tokens[:, :prompt_len])
    got = [got_p]
    for t in range(prompt_len, tokens.shape[1]):
        g, st = session.forward(tokens[:, t : t + 1], st)
        got.append(g)
        tick(t - prompt_len + 1)
    got = np.concatenate(got, 1).astype(np.float32)
    want = rec["logits"][:, -got.shape[1] :]
    refuse_non_finite(want, "the numpy reference")
    refuse_non_finite(got, "the artifact")
    m = compare_logits(want, got)
    m["state_drift"] = _state_drift(rec["wkv"], st)
    m["positions"] = int(got.shape[1] * tokens.shape[0])
    return m
