"""Training data: JSON Lines -> token windows with target masks (and token rewards) -> batches.

One JSON object per line. SFT rows:

    {"text": "..."}                          every text token is a target
    {"prompt": "...", "text": "..."}         prompt tokens are context only (mask 0)

REINFORCE rows (a reward per text token; positive raises its probability, negative lowers it):

    {"text": "...", "reward": 1.0}                               the same reward for every token
    {"text": "...", "rewards": [0.5, -1.0, ...]}                 one reward per token of `text`
    {"segments": [{"text": "...", "reward": 1.0}, ...]}          one reward per segment
    any of these with "prompt": "..."                            context only (mask 0, reward 0)

Tokens: models with the World vocabulary (V = 65536) use the World tokenizer; smaller
vocabularies (the synthetic `tiny` preset has V = 1024) use raw UTF-8 bytes, id = byte + 1 (the
World vocabulary's own ids for single bytes), so any text fits any V >= 257. Segments are
tokenized one by one, so no token straddles two rewards; `rewards` must have exactly as many
entries as `text` has tokens (the error says how many). Every row starts with id 0 (the World
end-of-document token) so that its first text token is predicted too.

Windows: a row longer than the sequence length T is cut into windows of T tokens that overlap by
one (a window's first token is the previous window's last target, here context only); shorter
windows are padded with id 0 and mask 0. mask[b, t] = 1 means x[b, t] is a loss target; it is 0
for pads, the leading 0 and prompt tokens. Each window starts from a zero state.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from rwkv_opt.errors import RwkvOptError
from rwkv_opt.training.graph import Objective

WORLD_VOCAB = 65536
BOS = 0


def tokenizer_for(vocab: int) -> Callable[[str], list[int]]:
    """The text -> ids function for a model with `vocab` rows (see module docstring)."""
    if vocab >= WORLD_VOCAB:
        from rwkv_opt.reference.tokenizer import load_world_tokenizer

        return load_world_tokenizer().encode
    if vocab < 257:
        raise RwkvOptError(f"the model's vocabulary has {vocab} rows; byte tokens need at least 257.")
    return lambda text: [b + 1 for b in text.encode("utf-8")]


@dataclass
class Example:
    tokens: np.ndarray  # (n,) int64, starting with BOS
    mask: np.ndarray  # (n,) int64, 1 where the token is a target
    reward: np.ndarray  # (n,) float32 (zeros for SFT)


@dataclass
class Batch:
    x: np.ndarray  # (B,T) int64
    mask: np.ndarray  # (B,T) int64
    reward: np.ndarray  # (B,T) float32

    def feeds(self, objective: Objective) -> dict[str, np.ndarray]:
        f = {"x": self.x, "mask": self.mask}
        if objective is Objective.REINFORCE:
            f["reward"] = self.reward
        return f


def _number(v) -> bool:
    """A finite int or float (JSON's true/false, NaN and Infinity are not rewards)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _row_example(row: dict, objective: Objective, encode, where: str) -> Example:
    def need_str(key):
        if not isinstance(row.get(key), str):
            raise RwkvOptError(f"{where}: '{key}' must be a string.")
        return row[key]

    prompt = encode(need_str("prompt")) if "prompt" in row else []
    if objective is Objective.SFT:
        if "text" not in row:
            raise RwkvOptError(f'{where}: an SFT row needs "text" (and optionally "prompt").')
        text = encode(need_str("text"))
        rewards = [0.0] * len(text)
    elif "segments" in row:
        segs = row["segments"]
        if not isinstance(segs, list) or not all(
            isinstance(s, dict) and isinstance(s.get("text"), str) and _number(s.get("reward")) for s in segs
        ):
            raise RwkvOptError(f'{where}: "segments" must be a list of {{"text": str, "reward": finite number}}.')
        text, rewards = [], []
        for s in segs:
            ids = encode(s["text"])
            text += ids
            rewards += [float(s["reward"])] * len(ids)
    elif "text" in row:
        text = encode(need_str("text"))
        if "rewards" in row:
            rewards = row["rewards"]
            if not isinstance(rewards, list) or len(rewards) != len(text):
                got = len(rewards) if isinstance(rewards, list) else repr(rewards)
                raise RwkvOptError(
                    f'{where}: "rewards" needs one number per token of "text" ({len(text)} tokens), got {got}.'
                )
            bad = next((i for i, r in enumerate(rewards) if not _number(r)), None)
            if bad is not None:
                raise RwkvOptError(
                    f'{where}: "rewards"[{bad}] is {json.dumps(rewards[bad])[:40]}, not a finite number.'
                )
        elif _number(row.get("reward")):
            rewards = [float(row["reward"])] * len(text)
        else:
            raise RwkvOptError(
                f'{where}: a REINFORCE row needs "reward" (finite number), "rewards" (list) or "segments".'
            )
    else:
        raise RwkvOptError(f'{where}: a REINFORCE row needs "text" or "segments".')
    if not text:
        raise RwkvOptError(f"{where}: the row has no text tokens to train on.")
    tokens = [BOS] + prompt + text
    mask = [0] * (1 + len(prompt)) + [1] * len(text)
    reward = [0.0] * (1 + len(prompt)) + [float(r) for r in rewards]
    return Example(np.asarray(tokens, np.int64), np.asarray(mask, np.int64), np.asarray(reward, np.float32))


def read_jsonl(path: Path, objective: Objective, vocab: int) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise RwkvOptError(f"{path} does not exist; pass a JSON Lines file with one row per line.")
    encode = tokenizer_for(vocab)
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
                row = json.loads(line) if line.strip() else None
            except UnicodeDecodeError as e:
                raise RwkvOptError(
                    f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})."
                ) from None
            except json.JSONDecodeError as e:
                raise RwkvOptError(f"{where}: not valid JSON ({e.msg}).") from None
            except RecursionError:
                raise RwkvOptError(f"{where}: the JSON nests too deeply.") from None
            if row is None:
                continue
            if not isinstance(row, dict):
                raise RwkvOptError(f"{where}: each line must be a JSON object.")
            ex = _row_example(row, objective, encode, where)
            if int(ex.tokens.max()) >= vocab:
                raise RwkvOptError(
                    f"{where}: token id {int(ex.tokens.max())} is outside the model's vocabulary ({vocab})."
                )
            out.append(ex)
    if not out:
        raise RwkvOptError(f"{path} holds no rows.")
    return out


def windows(examples: list[Example], seq: int) -> list[Example]:
    """Cut every example into windows of at most `seq` tokens, overlapping by one."""
    out = []
    for ex in examples:
        n, start = len(ex.tokens), 0
        while True:
            end = min(start + seq, n)
            m = ex.mask[start:end].copy()
            if start > 0:
                m[0] = 0  # already a target at the end of the previous window
            if m.any():
                out.append(Example(ex.tokens[start:end], m, ex.reward[start:end]))
            if end == n:
                break
            start = end - 1
    return out


def make_batch(items: list[Example], batch: int, seq: int) -> Batch:
    x = np.zeros((batch, seq), np.int64)
    mask = np.zeros((batch, seq), np.int64)
    reward = np.zeros((batch, seq), np.float32)
    for b, ex in enumerate(items):
        n = len(ex.tokens)
        x[b, :n], mask[b, :n], reward[b, :n] = ex.tokens, ex.mask, ex.reward
    return Batch(x, mask, reward)


def batches(wins: list[Example], batch: int, seq: int, seed: int = 0) -> Iterator[Batch]:
    """Endless batches: each epoch visits every window once in a fresh random order."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(wins))
        for i in range(0, len(order), batch):
            yield make_batch([wins[j] for j in order[i : i + batch]], batch, seq)


def all_batches(wins: list[Example], batch: int, seq: int) -> list[Batch]:
    """Every window once, in order (for evaluation)."""
    return [make_batch(wins[i : i + batch], batch, seq) for i in range(0, len(wins), batch)]
