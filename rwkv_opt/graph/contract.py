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


class Scope:
    """Node-name scopes: an API, not a convention. The builders (graph/model.py, graph/blocks.py,
    graph/wkv_chunked.py) open them with these constants and the passes find nodes by them
    (precision keeps MIXED scopes fp32, quantize excludes them, truncate cuts at BLOCK). A node made
    inside `g.scope(BLOCK.format(i))` then `g.scope(ATT)` is named "/blocks.{i}/att/<op>"; a test
    (tests/graph/test_base_graph.py) proves every path the passes read exists in the base graph."""

    BLOCK = "blocks.{i}"   # one per layer
    ATT = "att"            # time mix
    FFN = "ffn"            # channel mix
    HEAD = "head"          # ln_out and the output projection
    EMB = "emb"            # the embedding Gather (a node name at the top level)
    SHIFT = "shift"        # token shift (inside att and ffn)
    DECAY = "decay"        # w = exp(-e^-0.5 * sigmoid(...)): kept fp32, never quantized
    A = "a"                # in-context learning rate LoRA
    GATE = "gate"          # output gate LoRA
    V_MIX = "v_mix"        # value residual LoRA (layers > 0)
    NORMALIZE = "normalize"  # kk l2-normalize
    WKV = "wkv"            # the WKV recurrence (Scan or fused): fp32 with its state
    WKV_STEP = "wkv_step"  # the Scan body graph
    BONUS = "bonus"        # (r * k * r_k).sum * v
    LN_X = "ln_x"          # GroupNorm of the WKV output
    DEEPEMBED = "deepembed"  # RWKV-7a's DeepEmbed path in ffn


def scope_path(*parts: str) -> str:
    """The substring of node names under nested scopes: scope_path(ATT, DECAY) == "/att/decay/"."""
    return "/" + "/".join(parts) + "/"


def state_inputs(i: int) -> tuple[str, str, str]:
    return f"x_tmix_last_{i}", f"wkv_state_{i}", f"x_cmix_last_{i}"


def state_outputs(i: int) -> tuple[str, str, str]:
    return f"x_tmix_next_{i}", f"wkv_next_{i}", f"x_cmix_next_{i}"


def transposed(key: str) -> str:
    """Initializer name of a Linear weight stored pre-transposed ([in, out])."""
    return key + ".T"
