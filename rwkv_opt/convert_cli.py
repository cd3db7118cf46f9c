"""`rwkv-opt convert`: move a checkpoint between BlinkDL .pth, BlinkDL .safetensors and fla-hub folders."""

from __future__ import annotations

import time
from pathlib import Path

LAYOUTS = ("pth", "safetensors", "hf")


def cmd_convert(a) -> int:
    from rwkv_opt.checkpoint.layouts import convert
    from rwkv_opt.progress import set_sink

    t0 = time.perf_counter()
    with set_sink():  # progress with an ETA on stderr for large checkpoints
        w = convert(a.checkpoint, a.to, a.output)
    c = w.config
    print(
        f"wrote {a.output} ({a.to}) from {w.layout} {a.checkpoint}: {c.n_layer} layers, C={c.n_embd}, V={c.vocab}, "
        f"{len(w.raw)} tensors, {time.perf_counter() - t0:.1f}s"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between .pth, .safetensors and fla-hub folders")
    p.add_argument(
        "checkpoint", type=Path, help="a BlinkDL .pth, a .safetensors with BlinkDL keys, or an fla-hub folder"
    )
    p.add_argument(
        "--to",
        required=True,
        choices=LAYOUTS,
        help="pth, safetensors (BlinkDL keys), or hf (an fla-hub folder: config.json, model.safetensors, "
        "tokenizer vocabulary; what flash-linear-attention and llama.cpp's converter read)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="output file (pth, safetensors) or folder (hf)")
    p.set_defaults(func=cmd_convert)
