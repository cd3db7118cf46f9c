"""`rwkv-opt convert`: move a checkpoint between BlinkDL .pth, BlinkDL .safetensors and fla-hub folders."""

from __future__ import annotations

import time
from pathlib import Path

LAYOUTS = ("pth", "safetensors", "hf")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def shard_size(text: str | None) -> int | None:
    """'2GB', '500MB', '5GiB' or a byte count -> bytes (decimal units as Hugging Face's max_shard_size)."""
    import re

    from rwkv_opt.errors import RwkvOptError

    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m and _UNITS.get(m.group(2).upper())
    if not m or unit is None or float(m.group(1)) * unit < 1:
        raise RwkvOptError(f"--max-shard-size '{text}' is not a size; use e.g. 2GB, 500MB or 5GiB.")
    return int(float(m.group(1)) * unit)


def cmd_convert(a) -> int:
    from rwkv_opt.checkpoint.layouts import convert
    from rwkv_opt.progress import set_sink

    t0 = time.perf_counter()
    with set_sink():  # progress with an ETA on stderr for large checkpoints
        w = convert(a.checkpoint, a.to, a.output, shard_size(a.max_shard_size))
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
    p.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="hf only: split the weights into model-0000N-of-0000M.safetensors shards of at most SIZE "
        "(e.g. 2GB, 500MB, 5GiB) with a model.safetensors.index.json, as Hugging Face uploads do; "
        "default: one model.safetensors",
    )
    p.set_defaults(func=cmd_convert)
