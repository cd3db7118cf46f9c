"""The RWKV World vocabulary as a byte-level BPE tokenizer.json, the closest format og.Tokenizer loads.

og.Tokenizer (onnxruntime-extensions) reads BPE (HF tokenizer.json, tiktoken) and SentencePiece; the
World tokenizer is a greedy longest match over UTF-8 bytes. Every World token is a vocabulary entry
here under GPT-2's byte-to-unicode mapping with its World id, so decoding is exact, byte for byte.
Encoding comes as close to greedy longest match as one global merge order can
(reports/genai_tokenizer.md measures it, benchmarks/genai_tokenizer.py):

- the whole text is one pre-token: no word splitting that would cut tokens such as "\n\n" or ".\n";
- every split of a token into two vocabulary tokens is a merge, not one split per token, so a token
  forms whichever way its span was cut before (one split per token leaves thousands unreachable);
- merges that make longer tokens rank first, so when two overlapping merges compete the one building
  the longer token wins, as greedy longest match would;
- among tokens of one length, those that start where greedy's tokens start (after whitespace, at a
  capital) rank first: greedy reads left to right, so of two overlapping tokens it takes the one that
  starts a word (" Mad" + "am", not " M" + "adam");
- then those that occur most often inside longer tokens (the building blocks longer merges need).

BPE has no left-to-right order, so it still differs where greedy's order matters, and 2,238 World
tokens (mostly 3-byte characters such as U+732B) have no split into two tokens and come out as bytes.
The exact path is: encode with rwkv-opt's World tokenizer (or the official one) and hand the ids to
the generator with append_tokens.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Iterable

from rwkv_opt.reference.tokenizer import END_OF_DOC, load_world_tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
END_OF_DOC_TEXT = "<|endoftext|>"  # World id 0 (end of document) has no bytes; genai needs a name for it
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
# One pre-token for the whole text: onnxruntime-extensions applies GPT-2's word-splitting regex unless the
# pre-tokenizer names its own split, and that regex cuts World tokens such as "\n\n" in two.
_WHOLE_TEXT = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[\\s\\S]+"}, "behavior": "Isolated", "invert": False},
        _BYTE_LEVEL,
    ],
}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which ByteLevel (de)coders use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_model(vocab: dict[int, bytes]) -> tuple[dict[str, int], list[list[str]]]:
    """(vocab, merges) of the BPE model for World tokens {id: bytes}; see the module docstring for
    the merge order."""
    b2u = byte_to_unicode()
    text = {i: "".join(b2u[b] for b in token) for i, token in vocab.items()}
    ids = {token: i for i, token in vocab.items()}
    uses = building_block_counts(vocab.values())
    merges = []
    order = sorted((t for t in vocab.values() if len(t) > 1), key=lambda t: (-len(t), start_class(t), -uses[t], ids[t]))
    for token in order:
        for k in range(len(token) - 1, 0, -1):  # every split; the order within one token is moot
            left, right = ids.get(token[:k]), ids.get(token[k:])
            if left is not None and right is not None:
                merges.append([text[left], text[right]])
    return {text[i]: i for i in vocab}, merges


def start_class(token: bytes) -> int:
    """How likely greedy longest match is to start a token here, as a rank (lower first): after
    whitespace or at a capital a word begins, and greedy's tokens begin with words; mid-word letters
    and digits less so, a UTF-8 continuation byte (mid-character) least."""
    first = token[:1]
    if first in (b" ", b"\n", b"\t", b"\r"):
        return 0
    if first.isupper():
        return 1
    if first.isalnum():
        return 3
    return 4 if 0x80 <= first[0] < 0xC0 else 2


def building_block_counts(tokens: Iterable[bytes], longest: int = 12) -> Counter:
    """How often each token (up to `longest` bytes) occurs inside longer tokens of the vocabulary: among
    merges that make tokens of one length, those that make common building blocks rank first."""
    tokens = list(tokens)
    known, counts = set(tokens), Counter()
    for token in tokens:
        for start in range(len(token)):
            for end in range(start + 2, min(len(token) - (start == 0), start + longest) + 1):
                piece = token[start:end]
                if piece in known:
                    counts[piece] += 1
    return counts


def tokenizer_json(vocab: dict[int, bytes]) -> dict:
    """The HF tokenizer.json document (byte-level BPE, end of document as special token 0)."""
    bpe_vocab, merges = bpe_model(vocab)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": END_OF_DOC,
                "content": END_OF_DOC_TEXT,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": _WHOLE_TEXT,
        "post_processor": None,
        "decoder": _BYTE_LEVEL,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": {END_OF_DOC_TEXT: END_OF_DOC, **bpe_vocab},
            "merges": merges,
        },
    }


def tokenizer_config() -> dict:
    """tokenizer_config.json: no BOS/EOS added on encode (RWKV prompts start bare)."""
    special = {
        "content": END_OF_DOC_TEXT,
        "special": True,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "single_word": False,
    }
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": END_OF_DOC_TEXT,
        "eos_token": END_OF_DOC_TEXT,
        "unk_token": END_OF_DOC_TEXT,
        "pad_token": END_OF_DOC_TEXT,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
        "added_tokens_decoder": {str(END_OF_DOC): special},
    }


@functools.lru_cache(maxsize=1)
def _tokenizer_text() -> str:
    """tokenizer.json's text for the bundled World vocabulary (built once per process: ~2 s)."""
    world = load_world_tokenizer()
    return json.dumps(tokenizer_json({i: t for i, t in world.idx2token.items() if i != END_OF_DOC}), ensure_ascii=False)


def write_tokenizer(directory: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json for the bundled World vocabulary into `directory`."""
    (Path(directory) / TOKENIZER_FILE).write_text(_tokenizer_text(), encoding="utf-8")
    (Path(directory) / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config(), indent=1) + "\n")
