"""Experimental passes: exact rewrites that no target uses, because none measured faster on ORT CPU.

    fuse_token_shift_lerp   the token-shift lerps sharing (x, delta) as one broadcast
    fuse_lora               LoRA down-projections reading one tensor as one MatMul

Their measurements are in reports/fusions.md. They match by structure with onnx-graphsurgeon, which
the core does not need: install it with `pip install 'rwkv-opt[experimental]'`. Importing this
package registers both passes (`rwkv_opt.passes.base.get_pass` imports it on demand).
"""

from __future__ import annotations

try:
    import onnx_graphsurgeon  # noqa: F401
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
    from rwkv_opt.errors import RwkvOptError

    raise RwkvOptError(
        "the experimental fusion passes need onnx-graphsurgeon; install it with: pip install 'rwkv-opt[experimental]'."
    ) from e

from rwkv_opt.passes.experimental import fuse_lora, fuse_token_shift_lerp  # noqa: E402,F401  (register)

NAMES = ("fuse_token_shift_lerp", "fuse_lora")
