"""The model's external contract: I/O names (kept from youzow3/onnx_rwkv), shapes, metadata keys.

Programs written against the seed address the model by these names; keep them stable.
    x                  int64 [batch, seq]             token ids
    x_tmix_last_{i}    [batch, 1, C]                  time-mix token shift (LN1 output of last token)
    wkv_state_{i}      float32 [batch, H, N, N]       WKV state, [value, key]; fp32 in every precision
    x_cmix_last_{i}    [batch, 1, C]                  channel-mix token shift (LN2 output)
outputs: head [batch, seq or 1, V], x_tmix_next_{i}, wkv_next_{i}, x_cmix_next_{i}.
"""

from __future__ import annotations

import json

from rwkv_opt.config import ModelConfig
from rwkv_opt.errors import RwkvOptError

TOKENS = "x"
LOGITS = "head"


class Sampler:
    """I/O of the in-graph sampler that `--head sampling` appends (passes/sampling_head.py); the seed's
    spelling of "occurence" is kept, as programs feed it by name."""

    TOKEN = "y"  # int64 [batch]: the drawn token
    OCCURRENCE = "occurence"  # float [batch, V]: the penalties' running counts (input)
    OCCURRENCE_NEXT = "occurence_next"  # its next value (output)
    UNIFORM = "uniform"  # optional float [batch]: the draw's uniform sample
    TOKEN_BAN = "token_ban"  # optional banned-token mask


class Genai:
    """Names of an `rwkv-opt export genai` model (rwkv_opt/export/genai.py): onnxruntime-genai's
    defaults for a "decoder" with a recurrent state; per layer the two token-shift states are packed
    into one [B, 2, C] conv_state and the WKV state is the recurrent_state."""

    INPUT_IDS = "input_ids"
    LOGITS = "logits"
    PAST_CONV = "past_key_values.%d.conv_state"
    PAST_RECURRENT = "past_key_values.%d.recurrent_state"
    PRESENT_CONV = "present.%d.conv_state"
    PRESENT_RECURRENT = "present.%d.recurrent_state"


class Key:
    """metadata_props keys (values are strings; JSON where the reader parses them)."""

    N_LAYER = "rwkv_opt.n_layer"
    N_EMBD = "rwkv_opt.n_embd"
    HEAD_SIZE = "rwkv_opt.head_size"
    VOCAB = "rwkv_opt.vocab"
    VARIANT = "rwkv_opt.variant"  # "rwkv7" or "rwkv7a"
    CONFIG = "rwkv_opt.config"  # JSON: ModelConfig.to_dict()
    LOGITS = "rwkv_opt.logits"  # "all" or "last"
    PRECISION = "rwkv_opt.precision"  # JSON: {"weights", "activations", "wkv", "mode"?}
    STATE_DTYPES = "rwkv_opt.state_dtypes"  # JSON: {"x_tmix", "wkv", "x_cmix"} -> numpy dtype name
    VERSION = "rwkv_opt.version"
    SOURCE_DIGEST = "rwkv_opt.source_digest"
    PASSES = "rwkv_opt.passes"  # comma-separated names of the passes applied, in order
    QUANTIZATION = "rwkv_opt.quantization"  # JSON, set by passes/quantize.py
    SAMPLER = "rwkv_opt.head"  # "sampling" when the in-graph sampler is appended
    SAMPLING = "rwkv_opt.sampling"  # JSON: the sampler's defaults and feeds
    TRAIN = "rwkv_opt.train."  # prefix: training head (head, objective, seq, batch, trainable)


# The keys every base graph carries (graph/model.py writes them).
META_KEYS = (
    Key.N_LAYER,
    Key.N_EMBD,
    Key.HEAD_SIZE,
    Key.VOCAB,
    Key.VARIANT,
    Key.CONFIG,
    Key.LOGITS,
    Key.PRECISION,
    Key.STATE_DTYPES,
    Key.VERSION,
    Key.SOURCE_DIGEST,
)


def get_meta(model, key: str, default: str | None = None) -> str | None:
    for p in model.metadata_props:
        if p.key == key:
            return p.value
    return default


def set_meta(model, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


class Meta:
    """A model's rwkv-opt metadata, read in one place: from a ModelProto (`Meta.of(model)`) or from
    ORT's `get_modelmeta().custom_metadata_map` (`Meta(mapping)`). Missing keys read as None or the
    documented default; a value that does not parse is refused in one sentence."""

    def __init__(self, props: dict[str, str]):
        self.props = dict(props)

    @classmethod
    def of(cls, model) -> "Meta":
        return cls({p.key: p.value for p in model.metadata_props})

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.props.get(key, default)

    def _json(self, key: str, default):
        raw = self.props.get(key)
        if raw is None:
            return default
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise RwkvOptError(f"the model's metadata '{key}' is not valid JSON; rebuild the artifact.") from None

    @property
    def is_rwkv_opt(self) -> bool:
        return Key.CONFIG in self.props

    def config(self, where: str = "the model"):
        """The ModelConfig, or None for a model rwkv-opt did not build; a malformed entry (not JSON,
        unknown keys, sizes that are not positive integers) is refused in one sentence naming `where`."""
        if Key.CONFIG not in self.props:
            return None
        try:
            cfg = ModelConfig.from_dict(json.loads(self.props[Key.CONFIG]))
        except (json.JSONDecodeError, TypeError, KeyError, ValueError, RecursionError):
            cfg = None
        sizes = [getattr(cfg, k, None) for k in ("n_layer", "n_embd", "head_size", "vocab", "dim_ffn")]
        if cfg is None or not all(type(v) is int and v > 0 for v in sizes) or cfg.n_embd % cfg.head_size:
            raise RwkvOptError(f"{where} has a malformed {Key.CONFIG} metadata entry; rebuild the artifact.")
        return cfg

    @property
    def logits(self) -> str:
        return self.props.get(Key.LOGITS, "all")

    @property
    def precision(self) -> dict:
        return self._json(Key.PRECISION, {})

    @property
    def state_dtypes(self) -> dict:
        return self._json(Key.STATE_DTYPES, {})

    @property
    def quantization(self) -> dict | None:
        return self._json(Key.QUANTIZATION, None)

    @property
    def passes(self) -> list[str]:
        return [s for s in self.props.get(Key.PASSES, "").split(",") if s]

    @property
    def sampler(self) -> str | None:
        return self.props.get(Key.SAMPLER)

    @property
    def train(self) -> dict[str, str]:
        """The training head's fields (head, objective, seq, batch, trainable), as strings."""
        return {k[len(Key.TRAIN) :]: v for k, v in self.props.items() if k.startswith(Key.TRAIN)}


class Scope:
    """Node-name scopes: an API, not a convention. The builders (graph/model.py, graph/blocks.py,
    graph/wkv_chunked.py) open them with these constants and the passes find nodes by them
    (precision keeps MIXED scopes fp32, quantize excludes them, truncate cuts at BLOCK). A node made
    inside `g.scope(BLOCK.format(i))` then `g.scope(ATT)` is named "/blocks.{i}/att/<op>"; a test
    (tests/graph/test_base_graph.py) proves every path the passes read exists in the base graph."""

    BLOCK = "blocks.{i}"  # one per layer
    ATT = "att"  # time mix
    FFN = "ffn"  # channel mix
    HEAD = "head"  # ln_out and the output projection
    EMB = "emb"  # the embedding Gather (a node name at the top level)
    SHIFT = "shift"  # token shift (inside att and ffn)
    DECAY = "decay"  # w = exp(-e^-0.5 * sigmoid(...)): kept fp32, never quantized
    A = "a"  # in-context learning rate LoRA
    GATE = "gate"  # output gate LoRA
    V_MIX = "v_mix"  # value residual LoRA (layers > 0)
    NORMALIZE = "normalize"  # kk l2-normalize
    WKV = "wkv"  # the WKV recurrence (Scan or fused): fp32 with its state
    WKV_STEP = "wkv_step"  # the Scan body graph
    BONUS = "bonus"  # (r * k * r_k).sum * v
    LN_X = "ln_x"  # GroupNorm of the WKV output
    DEEPEMBED = "deepembed"  # RWKV-7a's DeepEmbed path in ffn
    TAIL = "tail"  # last block, logits "last": the WKV output cut to the last two positions


def scope_path(*parts: str) -> str:
    """The substring of node names under nested scopes: scope_path(ATT, DECAY) == "/att/decay/"."""
    return "/" + "/".join(parts) + "/"


def state_inputs(i: int) -> tuple[str, str, str]:
    return f"x_tmix_last_{i}", f"wkv_state_{i}", f"x_cmix_last_{i}"


def state_outputs(i: int) -> tuple[str, str, str]:
    return f"x_tmix_next_{i}", f"wkv_next_{i}", f"x_cmix_next_{i}"


def state_feedback(n_layer: int) -> dict[str, str]:
    """Each state output -> the state input it feeds on the next call, for all `n_layer` layers."""
    return {o: s for i in range(n_layer) for o, s in zip(state_outputs(i), state_inputs(i))}


def transposed(key: str) -> str:
    """Initializer name of a Linear weight stored pre-transposed ([in, out])."""
    return key + ".T"
