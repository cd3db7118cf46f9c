"""World tokenizer: token-for-token equality with the official rwkv TRIE_TOKENIZER."""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import pytest

from rwkv_opt.reference.tokenizer import StreamDecoder, WorldTokenizer, default_vocab_path, load_world_tokenizer

os.environ.setdefault("RWKV_V7_ON", "1")
rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
OFFICIAL_VOCAB = Path(rwkv_tokenizer.__file__).with_name("rwkv_vocab_v20230424.txt")


@pytest.fixture(scope="module")
def ours() -> WorldTokenizer:
    return load_world_tokenizer()


@pytest.fixture(scope="module")
def official():
    return rwkv_tokenizer.TRIE_TOKENIZER(str(OFFICIAL_VOCAB))


def random_unicode(seed: int, n: int) -> str:
    """Seeded random text over ASCII, Latin, Cyrillic, CJK, Hangul, emoji, rare planes."""
    rng = random.Random(seed)
    ranges = [
        (0x20, 0x7E),
        (0x09, 0x0D),
        (0xA0, 0x24F),
        (0x400, 0x4FF),
        (0x3040, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0x1F300, 0x1FAFF),
        (0x10000, 0x10FFFF),
    ]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


TEXTS = {
    "empty": "",
    "ascii": "Hello, world! The quick brown fox jumps over the lazy dog 1234567890.",
    "cjk": "你好，世界。我们今天去公园散步吧！日本語のテキストも。한국어 문장입니다.",
    "emoji": "🙂😀👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️‍🔥 🦀🐍",
    "code": 'def f(x):\n\treturn {"a": [1, 2, 3], \'b\': x ** 2}  # comment\n\nif __name__ == "__main__":\n    f(3)\n',
    "whitespace": "a  b\t\tc\n\n\nd \t \r\n   e" + " " * 200 + "\t" * 17 + "\n" * 9 + "\u3000\u00a0x",
    "long_runs": "#" * 300 + "-" * 161 + "=" * 99 + "0" * 50 + "ab" * 40,
    "mixed": "User: 用 Python 写一个 quicksort 🙂\n\nAssistant: ```python\ndef qs(a): ...\n```\u200b\ufeff",
    "controls": "".join(chr(i) for i in range(0, 128)) + "\x7f\x80\x9f",
}


def test_bundled_vocab_is_identical_to_official():
    ours_bytes = default_vocab_path().read_bytes()
    assert ours_bytes == OFFICIAL_VOCAB.read_bytes()
    assert len(ours_bytes) == 1_159_262
    assert hashlib.sha256(ours_bytes).hexdigest().startswith("8324476023347dec")


def test_vocab_shape(ours):
    assert ours.vocab_size == 65530
    assert len(ours.idx2token) == 65530  # 65529 file lines + id 0
    assert all(ours.idx2token[b + 1] == bytes([b]) for b in range(256))
    assert ours.decode_bytes([0]) == b"" and ours.decode([0, 0]) == ""
    assert load_world_tokenizer() is ours  # cached


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_matches_official(ours, official, name):
    text = TEXTS[name]
    ids = ours.encode(text)
    assert ids == official.encode(text)
    assert ours.decode(ids) == text
    assert ours.decode_bytes(ids) == text.encode("utf-8")


@pytest.mark.parametrize("seed", range(6))
def test_random_unicode_matches_official(ours, official, seed):
    text = random_unicode(seed, 4000)
    ids = ours.encode(text)
    assert ids == official.encode(text)
    assert ours.decode(ids) == text


@pytest.mark.parametrize("seed", range(4))
def test_invalid_utf8_bytes_match_official(ours, official, seed):
    rng = random.Random(100 + seed)
    # random bytes, plus fragments of multi-byte characters glued to ASCII
    frags = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) for _ in range(300)]
    frags += ["é中🙂".encode()[i:j] for i in range(7) for j in range(i + 1, 8)] * 3
    frags += [b"the ", b" and", b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\xaf"]
    rng.shuffle(frags)
    src = b"".join(frags)
    ids = ours.encode_bytes(src)
    assert ids == official.encodeBytes(src)
    assert ours.decode_bytes(ids) == src
    # replacement happens only once, after concatenation
    assert ours.decode(ids) == src.decode("utf-8", errors="replace")


def test_decode_replaces_only_at_the_end(ours):
    ids = [0xF0 + 1, 0x9F + 1, 0x99 + 1, 0x82 + 1]  # the four byte tokens of 🙂
    assert ours.decode(ids) == "🙂"
    assert ours.decode(ids[:2]) == "\ufffd"  # an unfinished character -> one U+FFFD


def test_unknown_id_raises(ours):
    with pytest.raises(KeyError, match="65535"):
        ours.decode_bytes([65535])


def test_stream_decoder_emoji_split_across_tokens(ours):
    # 🙂 as four single-byte tokens: nothing until the last byte arrives
    dec = ours.stream_decoder()
    assert isinstance(dec, StreamDecoder)
    outs = [dec.feed(i) for i in [ord("a") + 1, 0xF0 + 1, 0x9F + 1, 0x99 + 1, 0x82 + 1, ord("b") + 1]]
    assert outs == ["a", "", "", "", "🙂", "b"]
    assert dec.flush() == ""
    # an emoji the vocabulary itself splits into several tokens
    split = next(e for e in "🦀🐍🫠🧬🪐🥨🛸🦩" if len(ours.encode(e)) > 1)
    ids = ours.encode("x" + split + "y")
    dec.reset()
    outs = [dec.feed(i) for i in ids]
    assert "\ufffd" not in "".join(outs) and "".join(outs) == "x" + split + "y"
    assert split in outs  # emitted in one piece, once complete


def test_stream_decoder_pending_and_flush(ours):
    dec = StreamDecoder(ours)
    assert dec.feed(0xE4 + 1) == "" and dec.pending == b"\xe4"
    assert dec.feed(0xBD + 1) == "" and dec.pending == b"\xe4\xbd"
    assert dec.flush() == "\ufffd" and dec.pending == b""
    assert dec.feed(0xFF + 1) == "\ufffd"  # can never be valid: emitted at once
    assert dec.feed(0) == ""


@pytest.mark.parametrize("seed", range(3))
def test_stream_decoder_concatenation_equals_decode(ours, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(ours.vocab_size) for _ in range(400)] + [rng.randrange(1, 257) for _ in range(400)]
    rng.shuffle(ids)
    dec = StreamDecoder(ours)
    assert "".join(dec.feed(i) for i in ids) + dec.flush() == ours.decode(ids)


def test_encode_speed_100kb(ours, official, record_property):
    """Reports speed only (no assertion on time): ~100 KB of mixed text."""
    base = Path(__file__).read_text(encoding="utf-8") + random_unicode(7, 3000) + TEXTS["cjk"] * 20
    text = base * (100_000 // len(base.encode()) + 1)
    data = text.encode("utf-8")[:100_000]
    t0 = time.perf_counter()
    ids = ours.encode_bytes(data)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = official.encodeBytes(data)
    t_official = time.perf_counter() - t0
    assert ids == ref
    msg = (
        f"encode 100 KB ({len(ids)} tokens): ours {t_ours * 1e3:.1f} ms "
        f"({len(data) / t_ours / 1e6:.2f} MB/s), official {t_official * 1e3:.1f} ms"
    )
    record_property("encode_speed", msg)
    print(msg)
