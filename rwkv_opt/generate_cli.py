"""`rwkv-opt generate` and `rwkv-opt chat`: thin commands over rwkv_opt.runtime.generate."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from rwkv_opt.errors import RwkvOptError
from rwkv_opt.reference.sampler import OFFICIAL_PIPELINE_ARGS, SamplingParams

PRESETS = {"g1": SamplingParams(), "official": OFFICIAL_PIPELINE_ARGS}
SAMPLERS = {"auto": None, "graph": True, "host": False}


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="artifact directory (or model.onnx)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="g1",
                   help="sampling defaults: g1 (RWKV-7 G1 model card, the default) or official (PIPELINE_ARGS)")
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-p", type=float, help=">= 1 = no filtering")
    p.add_argument("--top-k", type=int, help="0 = off")
    p.add_argument("--alpha-presence", type=float)
    p.add_argument("--alpha-frequency", type=float)
    p.add_argument("--alpha-decay", type=float)
    p.add_argument("--seed", type=int, help="seed of the uniform stream (default: a fresh one)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="auto",
                   help="auto: in the graph when the model has the sampling head, else on the host")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--threads", type=int, help="ORT intra-op threads")


def _params(a) -> SamplingParams:
    given = {k: getattr(a, k) for k in ("temperature", "top_p", "top_k", "alpha_presence", "alpha_frequency",
                                        "alpha_decay") if getattr(a, k) is not None}
    return replace(PRESETS[a.preset], **given)


def _check_tokenizer(artifact: Path) -> None:
    """Refuse a model whose manifest records a tokenizer other than the World vocabulary used here."""
    from rwkv_opt.artifact import MANIFEST_FILE, read_manifest
    from rwkv_opt.checkpoint.layouts import WORLD

    folder = artifact if artifact.is_dir() else artifact.parent
    if (folder / MANIFEST_FILE).is_file():
        tok = read_manifest(folder).get("source", {}).get("tokenizer") or {}
        if tok.get("name", WORLD) != WORLD:
            raise RwkvOptError(f"{folder / MANIFEST_FILE}: source.tokenizer is '{tok['name']}' "
                               f"({tok.get('evidence')}), but generate and chat only speak the RWKV World "
                               f"vocabulary ({WORLD}).")


def _open(a):
    import onnxruntime as ort

    from rwkv_opt.reference.tokenizer import load_world_tokenizer
    from rwkv_opt.runtime import Session

    _check_tokenizer(a.artifact)
    ort.set_default_logger_severity(3)  # the head's overridable defaults each log a warning at load
    return Session(a.artifact, a.provider, threads=a.threads), load_world_tokenizer()


def cmd_generate(a) -> int:
    from rwkv_opt.runtime.generate import generate, uses_graph_sampler

    session, tokenizer = _open(a)
    in_graph = SAMPLERS[a.sampler]
    t0, n = time.perf_counter(), 0
    for piece in generate(session, tokenizer, a.prompt, a.max_tokens, _params(a), a.seed, in_graph):
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += 1
    sys.stdout.write("\n")
    where = "in the graph" if (uses_graph_sampler(session) if in_graph is None else in_graph) else "on the host"
    print(f"[{n} pieces in {time.perf_counter() - t0:.2f}s, sampling {where}]", file=sys.stderr)
    return 0


def cmd_chat(a) -> int:
    from rwkv_opt.runtime.generate import Chat

    session, tokenizer = _open(a)
    chat = Chat(session, tokenizer, _params(a), a.seed, a.max_tokens, SAMPLERS[a.sampler])
    print(f"chatting with {a.artifact} (/reset clears the state, /quit or end of input leaves)", file=sys.stderr)
    while True:
        sys.stdout.write("User: ")
        sys.stdout.flush()
        line = sys.stdin.readline()
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
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=200)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat that keeps the state between turns")
    _sampling_args(p)
    p.add_argument("--max-tokens", type=int, default=500, help="per reply")
    p.set_defaults(func=cmd_chat)
