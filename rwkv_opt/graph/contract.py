"""The model's external contract: I/O names (kept from youzow3/onnx_rwkv), shapes, metadata keys.

Programs written against the seed address the model by these names; keep them stable.
    x                  int64 [batch, seq]             token ids
    x_tmix_last_{i}    [batch, 1, C]                  time-mix token shift (LN1 output of last token)
    wkv_state_{i}      float32 [batch, H, N, N]       WKV state, [value, key]; fp32 in every precision
    x_cmix_last_{i}    [batch, 1, C]                  channel-mix token shift (LN2 output)
outputs: head [batch, seq or 1, V], x_tmix_next_{i}, wkv_next_{i}, x_cmix_next_{i}.
"""
from __future__ import annotations

TOKENS = "x"
LOGITS = "head"

# metadata_props keys (values are strings)
META_KEYS = ("rwkv_opt.n_layer", "rwkv_opt.n_embd", "rwkv_opt.head_size", "rwkv_opt.vocab",
             "rwkv_opt.variant", "rwkv_opt.config", "rwkv_opt.logits", "rwkv_opt.precision",
             "rwkv_opt.state_dtypes", "rwkv_opt.version", "rwkv_opt.source_digest")


def state_inputs(i: int) -> tuple[str, str, str]:
    return f"x_tmix_last_{i}", f"wkv_state_{i}", f"x_cmix_last_{i}"


def state_outputs(i: int) -> tuple[str, str, str]:
    return f"x_tmix_next_{i}", f"wkv_next_{i}", f"x_cmix_next_{i}"


def transposed(key: str) -> str:
    """Initializer name of a Linear weight stored pre-transposed ([in, out])."""
    return key + ".T"
