"""`rwkv-opt generate` and `rwkv-opt chat`: thin commands over rwkv_opt.runtime.generate."""

from __future__ import annotations

import argparse
import itertools
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

from rwkv_opt.errors import RwkvOptError
from rwkv_opt.reference.sampler import OFFICIAL_PIPELINE_ARGS, SamplingParams

CHAT_HELP = "/reset clears the state, /help shows this, /quit or end of input leaves"
PRESETS = {"g1": SamplingParams(), "official": OFFICIAL_PIPELINE_ARGS}
SAMPLERS = {"auto": None, "graph": True, "host": False}


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="artifact directory (or model.onnx)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="g1",
        help="sampling defaults: g1 (RWKV-7 G1 model card, the default) or official (PIPELINE_ARGS)",
    )
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the preset's)")
    p.add_argument("--top-p", type=float, help="nucleus mass kept; >= 1 = no filtering (default: the preset's)")
    p.add_argument("--top-k", type=int, help="candidates kept; 0 = off (default: the preset's)")
    p.add_argument("--alpha-presence", type=float, help="penalty once a token occurred (default: the preset's)")
    p.add_argument("--alpha-frequency", type=float, help="penalty per occurrence (default: the preset's)")
    p.add_argument("--alpha-decay", type=float, help="per-token decay of the occurrence counts (default: the preset's)")
    p.add_argument("--seed", type=int, help="seed of the uniform stream (default: a fresh one)")
    p.add_argument(
        "--sampler",
        choices=sorted(SAMPLERS),
        default="auto",
        help="auto: in the graph when the model has the sampling head, else on the host",
    )
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="ONNX Runtime execution provider")
    p.add_argument("--threads", type=int, help="ORT intra-op threads (default: ORT's choice)")
    p.add_argument(
        "--int8-twins",
        choices=["auto", "on", "off"],
        default="auto",
        help="a 4-bit artifact's block GEMMs on int8 copies made at load (CPU): prompts 1.2-1.9x faster, "
        "decode 0-15%% slower by CPU (reports/decode.md); off keeps the 4-bit kernels and less memory "
        "(default: auto = on)",
    )


def _params(a) -> SamplingParams:
    """The sampling settings; an option out of range is refused in one sentence."""
    from rwkv_opt.errors import RwkvOptError

    given = {
        k: getattr(a, k)
        for k in ("temperature", "top_p", "top_k", "alpha_presence", "alpha_frequency", "alpha_decay")
        if getattr(a, k) is not None
    }
    for k, v in given.items():
        if not math.isfinite(v) or v < 0:
            raise RwkvOptError(f"--{k.replace('_', '-')} must be a finite number >= 0, got {v}.")
    if not 1 <= a.max_tokens <= 1_000_000:
        raise RwkvOptError(f"--max-tokens must be between 1 and 1000000, got {a.max_tokens}.")
    if a.threads is not None and a.threads < 1:
        raise RwkvOptError(f"--threads must be at least 1, got {a.threads}.")
    return replace(PRESETS[a.preset], **given)


def _check_tokenizer(artifact: Path) -> None:
    """Refuse a model whose manifest records a tokenizer other than the World vocabulary used here."""
    from rwkv_opt.artifact import MANIFEST_FILE, Manifest
    from rwkv_opt.checkpoint.layouts import WORLD

    folder = artifact if artifact.is_dir() else artifact.parent
    if (folder / MANIFEST_FILE).is_file():
        tok = Manifest.read(folder).source.get("tokenizer") or {}
        if tok.get("name", WORLD) != WORLD:
            raise RwkvOptError(
                f"{folder / MANIFEST_FILE}: source.tokenizer is '{tok['name']}' "
                f"({tok.get('evidence')}), but generate and chat only speak the RWKV World "
                f"vocabulary ({WORLD})."
            )


def _utf8(text: str, what: str) -> str:
    """`text` if it is valid UTF-8 (argv and stdin keep undecodable bytes as lone surrogates), else refused."""
    from rwkv_opt.errors import RwkvOptError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RwkvOptError(
            f"{what} is not valid UTF-8 (a stray byte at character {e.start}); pass UTF-8 text."
        ) from None
    return text


def _read_line(n: int) -> str:
    """Line `n` of the chat input ("" at its end); bytes that are not UTF-8 are refused."""
    from rwkv_opt.errors import RwkvOptError

    raw = sys.stdin.buffer.readline() if hasattr(sys.stdin, "buffer") else sys.stdin.readline()
    if isinstance(raw, str):
        return _utf8(raw, f"line {n} of the chat input")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RwkvOptError(
            f"line {n} of the chat input is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
            f"{e.start}); send UTF-8 text."
        ) from None


def _open(a):
    """The artifact's session and the tokenizer; says so on stderr when the model has random weights."""
    from rwkv_opt.config import Provider
    from rwkv_opt.graph.contract import Key
    from rwkv_opt.errors import RwkvOptError
    from rwkv_opt.reference.tokenizer import load_world_tokenizer
    from rwkv_opt.runtime import Session, available_providers

    if Provider(a.provider) not in available_providers():
        raise RwkvOptError(
            f"execution provider '{a.provider}' is not available in this onnxruntime; install "
            "onnxruntime-gpu on a CUDA machine, or use --provider cpu."
        )
    _check_tokenizer(a.artifact)
    twins = {"auto": None, "on": True, "off": False}[a.int8_twins]
    session = Session(a.artifact, a.provider, threads=a.threads, int8_twins=twins)
    if session.meta.get(Key.SOURCE_DIGEST, "").startswith("synthetic"):
        print(
            f"note: {a.artifact} was built from a synthetic checkpoint (random weights), so its text is random "
            "tokens, not language; build from a trained .pth (--checkpoint) for real text",
            file=sys.stderr,
        )
    return session, load_world_tokenizer()


def cmd_generate(a) -> int:
    from rwkv_opt.runtime.generate import generate, uses_graph_sampler

    prompt, params = _utf8(a.prompt, "--prompt"), _params(a)
    session, tokenizer = _open(a)
    in_graph = SAMPLERS[a.sampler]
    t0, tokens = time.perf_counter(), []
    for piece in generate(session, tokenizer, prompt, a.max_tokens, params, a.seed, in_graph, on_token=tokens.append):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    where = "in the graph" if (uses_graph_sampler(session) if in_graph is None else in_graph) else "on the host"
    twins = f", {session.int8_twins} block GEMMs on int8 twins" if session.int8_twins else ""
    print(f"[{len(tokens)} tokens in {time.perf_counter() - t0:.2f}s, sampling {where}{twins}]", file=sys.stderr)
    return 0


def cmd_chat(a) -> int:
    from rwkv_opt.runtime.generate import Chat

    params = _params(a)
    session, tokenizer = _open(a)
    chat = Chat(session, tokenizer, params, a.seed, a.max_tokens, SAMPLERS[a.sampler])
    print(f"chatting with {a.artifact} ({CHAT_HELP})", file=sys.stderr)
    for n in itertools.count(1):
        sys.stdout.write("User: ")
        sys.stdout.flush()
        line = _read_line(n)
        if not line:
            sys.stdout.write("\n")
            return 0
        message = line.strip()
        if message == "/quit":
            return 0
        if message == "/reset":
            chat.reset()
            print("(state reset)")
            continue
        if message in ("/help", "/?") or re.fullmatch(r"/\w+", message):  # a command, never sent to the model
            print(CHAT_HELP if message in ("/help", "/?") else f"unknown command {message}: {CHAT_HELP}")
            continue
        if not message:
            continue
        sys.stdout.write("Assistant:")
        for piece in chat.reply(message):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n\n")


def register(sub) -> None:
    p = sub.add_parser("generate", help="stream a continuation of a prompt")
    _sampling_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-tokens", type=int, default=200, help="most tokens to generate")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat that keeps the state between turns")
    _sampling_args(p)
    p.add_argument("--max-tokens", type=int, default=500, help="per reply")
    p.set_defaults(func=cmd_chat)
