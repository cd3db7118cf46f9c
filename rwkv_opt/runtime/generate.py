"""Text generation over an artifact: streaming `generate` and the turn-taking `Chat`.

Sampling runs in the graph when the model has the sampling head (metadata rwkv_opt.head =
sampling), else on the host with the numpy reference sampler (rwkv_opt.reference.sampler). Both
take their uniforms from one stream, ``np.random.default_rng(seed).random(1)`` per drawn token,
so a seed gives the same tokens on either path (up to float32 softmax rounding that would matter
only for a uniform within ~1e-7 of a cdf step). The model state and the penalty state
(occurrence) are carried from token to token.

Vocabulary (the RWKV World tokenizer has ids 0-65529; RWKV-7 heads have 65536 rows):
* ids the model can emit but the tokenizer cannot decode (65530..V-1) are banned, so every
  emitted token decodes;
* a model with V < 65530 (the synthetic "tiny" preset has V = 1024) cannot read World ids >= V:
  such a token is spelled as its bytes instead (ids 1-256 are the single bytes 0x00-0xFF), so
  ``decode(encode(text)) == text`` still holds; this needs V >= 257.
Token 0 (end of document) ends `generate`; `Chat` bans it, as the official chat demo does.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Callable, Iterator, Sequence

import numpy as np

from rwkv_opt.graph.contract import Meta
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph import contract
from rwkv_opt.passes import sampling_head as head
from rwkv_opt.reference.sampler import Occurrence, SamplingParams, occurrence_exempt_mask, sample_step
from rwkv_opt.reference.tokenizer import END_OF_DOC, WorldTokenizer, load_world_tokenizer
from rwkv_opt.runtime.session import Session

BYTE_TOKENS = 257  # ids 0-256: end of document and the 256 single bytes


class TokenCodec:
    """Text <-> ids for a model with vocabulary size `vocab` (see the module docstring)."""

    def __init__(self, tokenizer: WorldTokenizer, vocab: int):
        if vocab < BYTE_TOKENS:
            raise RwkvOptError(f"a model with vocab {vocab} < {BYTE_TOKENS} cannot spell text in World byte tokens.")
        self.tokenizer, self.vocab = tokenizer, vocab

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i in self.tokenizer.encode(text):
            ids.extend([i] if i < self.vocab else [b + 1 for b in self.tokenizer.token_bytes(i)])
        return ids

    def undecodable(self) -> tuple[int, ...]:
        """Ids the model can emit that the tokenizer cannot decode."""
        return tuple(range(self.tokenizer.vocab_size, self.vocab))


def uses_graph_sampler(session: Session) -> bool:
    return Meta(session.meta).sampler == head.NAME


class _Sampler:
    """Feeds tokens, carries the model state and the occurrence, draws the next token."""

    def __init__(self, session: Session, params: SamplingParams, seed: int | None, in_graph: bool | None = None):
        self.session, self.params = session, params
        self.in_graph = uses_graph_sampler(session) if in_graph is None else in_graph
        if self.in_graph and not uses_graph_sampler(session):
            raise RwkvOptError(
                f"{session.path} has no sampling head; build it with `--head sampling` or sample on the host."
            )
        self.vocab = session.config.vocab
        self.rng = np.random.default_rng(seed)
        self._stepper = None  # one-token steps (runtime/stepper.py); prompts go through Session
        self.state = session.zero_state(1)
        self.feeds = head.sampling_feeds(params)
        self.exempt = occurrence_exempt_mask(size=self.vocab)
        self.reset_occurrence()

    @property
    def state(self) -> dict:
        return self._stepper.state if self._stepper is not None else self._state

    @state.setter
    def state(self, value: dict) -> None:
        self._leave_stepper()
        self._state = value

    def _leave_stepper(self) -> None:
        """Take the state (and the head's occurrence) back from the stepper, if one is running."""
        if self._stepper is not None:
            self._state = self._stepper.state
            if self.in_graph:
                self.occurence = self._stepper.carried(head.OCCURRENCE)
            self._stepper = None

    def reset_occurrence(self) -> None:
        self._leave_stepper()
        self.occurrence = Occurrence.zeros(self.vocab)
        self.occurence = np.zeros((1, self.vocab), np.float32)  # the head's encoding

    def _one_token(self, ids: np.ndarray, u: np.ndarray) -> int:
        """A decode step through the stepper (its buffers reused; same results as Session.run)."""
        if self._stepper is None:
            carry = {head.OCCURRENCE_NEXT: (head.OCCURRENCE, self.occurence)} if self.in_graph else None
            self._stepper = self.session.stepper(self._state, 1, carry)
        if not self.in_graph:
            return self._draw_on_host(self._stepper.step(ids)[contract.LOGITS], u)
        return self._head_token(self._stepper.step(ids, {**self.feeds, head.UNIFORM: u}))

    def _draw_on_host(self, logits: np.ndarray, u: np.ndarray) -> int:
        """The host sampler's token after the last position's logits (non-finite ones refused)."""
        _refuse_non_finite(self.session, "logits", logits[0, -1])
        return int(sample_step(logits[0, -1], self.occurrence, self.params, float(u[0]), self.exempt))

    def _head_token(self, out: dict) -> int:
        """The sampling head's token; its last-layer state output checked first (downstream of every layer
        but the head, and (B, 1, C): cheap per token), named as the state input it feeds."""
        n = self.session.config.n_layer
        _refuse_non_finite(
            self.session, f"state '{contract.state_inputs(n - 1)[2]}'", out[contract.state_outputs(n - 1)[2]]
        )
        return int(out[head.TOKEN][0])

    def step(self, tokens: Sequence[int]) -> int:
        """Feed `tokens` (>= 1) and draw the token that follows them. Non-finite logits (or, with the
        sampling head, which keeps the logits inside, a non-finite last-layer state: NaN weights in any layer
        reach it; only NaN in the head itself goes unseen there) are refused: a broken model must not print
        nothing and succeed."""
        ids = self.session.check_tokens(np.asarray(tokens).reshape(1, -1))
        u = self.rng.random(1)
        if ids.shape[1] == 1:
            return self._one_token(ids, u)
        self._leave_stepper()
        if not self.in_graph:
            logits, self._state = self.session.forward(ids, self._state)
            return self._draw_on_host(logits, u)
        chunk = self.session.max_chunk
        for s in range(0, ids.shape[1], chunk):
            last = s + chunk >= ids.shape[1]
            feed = {
                contract.TOKENS: ids[:, s : s + chunk],
                **self.state,
                **self.feeds,
                head.OCCURRENCE: self.occurence,
                head.UNIFORM: u if last else np.zeros(1),
            }
            out = self.session.run(feed)
            self._state = {dst: out[src] for src, dst in contract.state_feedback(self.session.config.n_layer).items()}
        token = self._head_token(out)  # a non-finite state is refused before the occurrence moves on
        self.occurence = out[head.OCCURRENCE_NEXT]
        return token


def _refuse_non_finite(session: Session, what: str, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise RwkvOptError(
            f"{session.path} produced non-finite {what} (NaN or inf): its weights are broken; "
            "rebuild it from a sound checkpoint (`rwkv-opt inspect --verify` checks the files)."
        )


def generate(
    session: Session,
    tokenizer: WorldTokenizer,
    prompt: str,
    max_tokens: int = 200,
    params: SamplingParams = SamplingParams(),
    seed: int | None = None,
    in_graph: bool | None = None,
    on_token: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """Stream the continuation of `prompt`, piece by piece, until max_tokens or end of document.

    in_graph: None = the model's head when it has one; False forces host-side sampling.
    on_token(id) is called for each generated token (a piece can hold several tokens, or none yet).
    """
    if max_tokens <= 0:
        return
    codec = TokenCodec(tokenizer, session.config.vocab)
    params = replace(params, token_ban=tuple(sorted(set(params.token_ban) | set(codec.undecodable()))))
    ids = codec.encode(prompt) or [END_OF_DOC]  # an empty prompt starts a new document
    sampler = _Sampler(session, params, seed, in_graph)
    decoder = tokenizer.stream_decoder()
    token = sampler.step(ids)
    for n in range(max_tokens):
        if token == END_OF_DOC:
            break
        if on_token is not None:
            on_token(token)
        piece = decoder.feed(token)
        if piece:
            yield piece
        if n + 1 < max_tokens:
            token = sampler.step([token])
    tail = decoder.flush()
    if tail:
        yield tail


class Chat:
    """Turn-taking chat in the RWKV format, the state kept between turns.

    Each turn feeds ``"User: {message}\\n\\nAssistant:"`` and streams the reply until it produces
    "\\n\\n" (not shown), or max_tokens (then "\\n\\n" is fed to close the turn). As in the official
    chat demo, the message's newline runs collapse to one, the occurrence restarts every reply and
    end-of-document is banned.
    """

    def __init__(
        self,
        session: Session,
        tokenizer: WorldTokenizer | None = None,
        params: SamplingParams = SamplingParams(),
        seed: int | None = None,
        max_tokens: int = 500,
        in_graph: bool | None = None,
    ):
        self.tokenizer = tokenizer or load_world_tokenizer()
        self.codec = TokenCodec(self.tokenizer, session.config.vocab)
        ban = set(params.token_ban) | set(self.codec.undecodable()) | {END_OF_DOC}
        self.sampler = _Sampler(session, replace(params, token_ban=tuple(sorted(ban))), seed, in_graph)
        self.session, self.max_tokens = session, max_tokens
        self.fed: list[int] = []  # every token the state has seen since the last reset

    def reset(self) -> None:
        self.sampler.state = self.session.zero_state(1)
        self.fed = []

    def _feed(self, ids: list[int]) -> int:
        self.fed += ids
        return self.sampler.step(ids)

    def reply(self, message: str) -> Iterator[str]:
        message = re.sub(r"\n+", "\n", message.strip())
        self.sampler.reset_occurrence()
        token = self._feed(self.codec.encode(f"User: {message}\n\nAssistant:"))
        decoder, text, shown = self.tokenizer.stream_decoder(), "", 0
        for _ in range(self.max_tokens):
            text += decoder.feed(token)
            end = text.find("\n\n")
            visible = text[:end] if end >= 0 else text.rstrip("\n")  # hold back a possible "\n\n"
            if len(visible) > shown:
                yield visible[shown:]
                shown = len(visible)
            following = self._feed([token])  # the state reads every shown token, the last one too
            if end >= 0:
                return
            token = following
        self._feed(self.codec.encode("\n\n"))  # the last drawn token is dropped; close the turn
