"""Which parameters train: a comma-separated union of selectors over checkpoint key names.

    all            every trained tensor (everything but layer 0's unused v0/v1/v2)
    lora           the low-rank matrices att.{w,a,v,g}{1,2} of every block (and DeepEmbed's s1, s2)
    last:N         every tensor of the last N blocks
    <glob>         fnmatch over key names, e.g. 'head.weight', 'blocks.*.ln*', 'ln_out.*'
    !<selector>    remove what the selector matches, e.g. 'all,!emb.weight,!head.weight'

Selectors apply left to right. A selector that matches nothing is an error (a typo would
otherwise silently train less than asked).
"""

from __future__ import annotations

import fnmatch
import re

from rwkv_opt.errors import RwkvOptError

_LORA = re.compile(r"^blocks\.\d+\.(att\.[wavg][12]|ffn\.s[12])$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _match(selector: str, names: list[str], n_layer: int) -> list[str]:
    if selector == "all":
        return list(names)
    if selector == "lora":
        return [k for k in names if _LORA.match(k)]
    if selector.startswith("last:"):
        try:
            n = int(selector[5:])
        except ValueError:
            raise RwkvOptError(f"trainable selector '{selector}' needs a block count, e.g. last:2.") from None
        if not 1 <= n <= n_layer:
            raise RwkvOptError(f"trainable selector '{selector}': the model has {n_layer} blocks; use 1..{n_layer}.")
        return [k for k in names if (m := _BLOCK.match(k)) and int(m.group(1)) >= n_layer - n]
    return [k for k in names if fnmatch.fnmatchcase(k, selector)]


def select_trainable(spec: str, names, n_layer: int) -> list[str]:
    """The parameter names `spec` selects, in the order of `names`."""
    names = list(names)
    chosen: set[str] = set()
    for raw in (s.strip() for s in spec.split(",")):
        if not raw:
            continue
        drop = raw.startswith("!")
        sel = raw[1:] if drop else raw
        hit = _match(sel, names, n_layer)
        if not hit:
            raise RwkvOptError(
                f"trainable selector '{sel}' matches no parameter; use all, lora, last:N "
                "or a glob over checkpoint keys such as 'blocks.*.att.*' or 'head.weight'."
            )
        chosen = chosen - set(hit) if drop else chosen | set(hit)
    out = [k for k in names if k in chosen]
    if not out:
        raise RwkvOptError(f"trainable '{spec}' leaves no parameter to train.")
    return out
