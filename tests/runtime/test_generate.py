"""Generation on tiny artifacts: in-graph vs host sampling, chat state, and the CLI as a user drives it."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import numpy as np
import pytest

from rwkv_opt.errors import RwkvOptError
from rwkv_opt.reference.sampler import OFFICIAL_PIPELINE_ARGS, SamplingParams
from rwkv_opt.reference.tokenizer import load_world_tokenizer
from rwkv_opt.runtime import Session
from rwkv_opt.runtime.generate import Chat, TokenCodec, generate, uses_graph_sampler

CLI = [sys.executable, "-m", "rwkv_opt.cli"]


def cli(*args, **kw):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """{'head': tiny cpu-fp32 artifact with the sampling head, 'plain': the base graph without one}."""
    d = tmp_path_factory.mktemp("gen")
    r = cli("pipeline", "--target", "cpu-fp32", "--head", "sampling", "-o", d / "head")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("build", "--logits", "last", "-o", d / "plain")
    assert r.returncode == 0, r.stderr
    return {"head": d / "head", "plain": d / "plain"}


@pytest.fixture(scope="module")
def tok():
    return load_world_tokenizer()


@pytest.fixture(scope="module")
def head_session(artifacts):
    return Session(artifacts["head"], threads=2)


def test_codec_for_small_and_full_vocab(tok):
    text = "User: 你好 🙂 naïve code()\n\n\tx = 42"
    small = TokenCodec(tok, 1024)
    ids = small.encode(text)
    assert max(ids) < 1024 and tok.decode(ids) == text
    assert len(ids) > len(tok.encode(text))  # tokens >= 1024 were spelled as bytes
    assert small.undecodable() == ()
    assert TokenCodec(tok, 65536).undecodable() == tuple(range(65530, 65536))
    assert TokenCodec(tok, 65536).encode(text) == tok.encode(text)
    with pytest.raises(RwkvOptError, match="byte tokens"):
        TokenCodec(tok, 200)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        OFFICIAL_PIPELINE_ARGS,
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, top_p=1.0, top_k=20),
    ],
    ids=["g1", "official", "greedy", "top_k"],
)
def test_in_graph_sampling_equals_host_sampling(head_session, tok, params):
    """Same seed, same uniform stream: the head and the numpy sampler produce the same text."""
    assert uses_graph_sampler(head_session) and head_session.has_sampler
    graph = "".join(generate(head_session, tok, "The quick brown fox", 40, params, seed=7, in_graph=True))
    host = "".join(generate(head_session, tok, "The quick brown fox", 40, params, seed=7, in_graph=False))
    assert graph and graph == host
    other = "".join(generate(head_session, tok, "The quick brown fox", 40, params, seed=8, in_graph=True))
    assert (other == graph) == (params.temperature == 0)  # greedy ignores the seed


def test_plain_model_samples_on_the_host(artifacts, tok):
    plain = Session(artifacts["plain"], threads=2)
    assert not uses_graph_sampler(plain)
    pieces = list(generate(plain, tok, "Hello", 25, seed=1))
    assert pieces and all(isinstance(p, str) and p for p in pieces)
    assert len(pieces) <= 25 + 1  # one piece per token at most, plus the flushed tail
    with pytest.raises(RwkvOptError, match="no sampling head"):
        list(generate(plain, tok, "Hello", 5, in_graph=True))


def test_chat_keeps_the_state_between_turns(head_session, tok):
    chat = Chat(head_session, tok, seed=3, max_tokens=30)
    first = "".join(chat.reply("Hi there"))
    n_first = len(chat.fed)
    second = "".join(chat.reply("And  then?\n\n\nmore"))
    assert "\n\n" not in first + second
    assert tok.decode(chat.fed).startswith("User: Hi there\n\nAssistant:")
    assert "User: And  then?\nmore\n\nAssistant:" in tok.decode(chat.fed[n_first:])  # newline runs collapsed
    assert tok.decode(chat.fed).count("\n\n") == 4  # every turn, prompt and reply, closed by "\n\n"
    _, state = head_session.forward(chat.fed)  # the whole transcript from scratch
    for name, value in state.items():
        np.testing.assert_allclose(chat.sampler.state[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    again = Chat(head_session, tok, seed=3, max_tokens=30)
    assert "".join(again.reply("Hi there")) == first
    chat.reset()
    assert chat.fed == [] and all(not v.any() for v in chat.sampler.state.values())


def test_cli_generate_with_and_without_head(artifacts):
    def story(artifact, *options):
        return cli("generate", artifacts[artifact], "--prompt", "Once upon a time", "--max-tokens", "24", *options)

    graph = story("head", "--seed", "5")
    assert graph.returncode == 0, graph.stderr
    assert graph.stdout.strip() and "sampling in the graph" in graph.stderr and "Warning" not in graph.stderr
    host = story("head", "--seed", "5", "--sampler", "host")
    assert host.returncode == 0 and host.stdout == graph.stdout and "on the host" in host.stderr
    greedy = ("--preset", "official", "--temperature", "0")
    plain = story("plain", *greedy, "--seed", "1")
    assert plain.returncode == 0 and plain.stdout.strip() and "on the host" in plain.stderr
    assert story("plain", *greedy, "--seed", "2").stdout == plain.stdout  # temperature 0: the seed does not matter
    bad = cli("generate", artifacts["plain"], "--prompt", "x", "--sampler", "graph")
    assert bad.returncode == 2 and "no sampling head" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_generate_int8_twins_option(tmp_path):
    """A 4-bit artifact decodes on int8 twins by default (the summary line says how many), on its own 4-bit
    kernels with --int8-twins off; a plain float artifact has none either way."""
    r = cli("pipeline", "--target", "cpu-int4", "--no-verify", "-o", tmp_path / "int4")
    assert r.returncode == 0, r.stderr[-2000:]
    run = ("generate", tmp_path / "int4", "--prompt", "Hi", "--max-tokens", "4", "--temperature", "0")
    default, off = cli(*run), cli(*run, "--int8-twins", "off")
    assert default.returncode == 0 and off.returncode == 0, default.stderr + off.stderr
    assert default.stdout.strip() and off.stdout.strip()
    assert ", 8 block GEMMs on int8 twins]" in default.stderr  # tiny: 2 layers x r, k, v, o
    assert "GEMMs on int8 twins" not in off.stderr and "sampling on the host]" in off.stderr
    bad = cli(*run, "--int8-twins", "maybe")
    assert bad.returncode == 2 and "invalid choice: 'maybe'" in bad.stderr


def _read_until(proc, marker: str, timeout: float = 120.0) -> str:
    """Read the child's stdout until it ends with `marker` (the prompt), as a terminal user waits."""
    out, end = b"", time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while not out.decode("utf-8", "replace").endswith(marker):
        left = end - time.monotonic()
        assert left > 0, f"no {marker!r} after {timeout}s; got {out[-300:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, f"chat exited early: {out[-300:]!r}"
            out += chunk
    return out.decode("utf-8", "replace")


def test_cli_chat_as_a_user(artifacts):
    proc = subprocess.Popen(
        [*CLI, "chat", artifacts["head"], "--seed", "4", "--max-tokens", "20"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert _read_until(proc, "User: ") == "User: "
        proc.stdin.write(b"hello, how are you?\n")
        proc.stdin.flush()
        first = _read_until(proc, "User: ")
        assert first.startswith("Assistant:") and first.endswith("\n\nUser: ") and len(first) > len("Assistant:")
        proc.stdin.write(b"/reset\n")
        proc.stdin.flush()
        assert _read_until(proc, "User: ") == "(state reset)\nUser: "
        proc.stdin.write("再见 🙂\n".encode())
        proc.stdin.flush()
        assert _read_until(proc, "User: ").startswith("Assistant:")
        proc.stdin.close()  # end of input leaves cleanly
        assert proc.wait(timeout=60) == 0
        assert "chatting with" in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
