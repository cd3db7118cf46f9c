"""Checkpoint layouts: BlinkDL .pth, BlinkDL keys in .safetensors, and fla-hub Hugging Face folders.

``open_checkpoint`` detects the layout by content (a folder with config.json is a Hugging Face
folder; a file whose first bytes are a safetensors header, or named .safetensors/.st, is read as
safetensors; anything else goes to the .pth reader), maps fla keys to the canonical BlinkDL names
and shapes, validates, and returns ``Weights`` carrying the layout, a digest and the tokenizer.
Every tensor stays a zero-copy view of a memory map (a transposed view for the fla LoRA matrices)
until ``Weights.f32`` converts it.

The fla-hub mapping follows flash-linear-attention's utils/convert_from_rwkv7.py and the shapes of
fla/layers/rwkv7.py: attn.x_* are (1,1,C); k_k, k_a, ffn.x_k and the LoRA biases (w0, a0, v0) are
(C,); the LoRA matrices are transposed; blocks.0.att.v0/v1/v2 (unused) are absent. Older converters
kept (1,1,C) for the vectors: reading accepts either. flash-linear-attention has no RWKV-7a
(DeepEmbed) model, so there is no fla-hub 7a layout: writing one is refused.

Digest of a folder: sha256 over the lines ``<file name> <sha256 of the file>\\n`` for config.json,
model.safetensors.index.json (when sharded) and each weight file in name order; tokenizer files
are not covered (the tokenizer is recorded on its own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from rwkv_opt.checkpoint.safetensors_io import is_safetensors, read_safetensors, write_safetensors
from rwkv_opt.checkpoint.torchzip import open_pth, release_pages, write_pth
from rwkv_opt.checkpoint.bounds import require_finite
from rwkv_opt.checkpoint.weights import _OPTIONAL, Weights, file_digest, load_pth, validate
from rwkv_opt.config import SQUEEZABLE, ModelConfig, expected_shapes
from rwkv_opt.errors import CheckpointError
from rwkv_opt.reference.tokenizer import VOCAB_NAME, default_vocab_path

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
ARCHITECTURE = "RWKV7ForCausalLM"
WORLD = Path(VOCAB_NAME).stem  # the tokenizer name recorded for the RWKV World vocabulary
_JSON_CAP = 64 << 20  # config and index files are a few KiB to a few MiB
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
_ST_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


def _pairs() -> list[tuple[str, str, bool]]:
    """(BlinkDL suffix, fla suffix, transposed) for one layer: the issue's table."""
    out = [
        (f"{b}.{wb}", f"{f}.{wb}", False)
        for b, f in (("ln0", "pre_norm"), ("ln1", "attn_norm"), ("ln2", "ffn_norm"), ("att.ln_x", "attn.g_norm"))
        for wb in ("weight", "bias")
    ]
    out += [
        (f"att.{b}.weight", f"attn.{f}.weight", False)
        for b, f in (("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"), ("output", "o_proj"))
    ]
    for x in "wavg":
        out += [
            (f"att.{x}1", f"attn.{x}_lora.lora.0.weight", True),
            (f"att.{x}2", f"attn.{x}_lora.lora.2.weight", True),
        ]
        out += [(f"att.{x}0", f"attn.{x}_lora.lora.2.bias", False)] if x != "g" else []
    out += [(f"att.{n}", f"attn.{n}", False) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_k", "k_a", "r_k")]
    out += [(f"ffn.{n}", f"ffn.{n}", False) for n in ("x_k", "key.weight", "value.weight")]
    return out


_GLOBAL = {
    "emb.weight": "model.embeddings.weight",
    "ln_out.weight": "model.norm.weight",
    "ln_out.bias": "model.norm.bias",
    "head.weight": "lm_head.weight",
}
_GLOBAL_BLINK = {f: b for b, f in _GLOBAL.items()}
_TO_FLA = {b: (f, t) for b, f, t in _pairs()}
_TO_BLINK = {f: (b, t) for b, f, t in _pairs()}
_BLINK_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")
_FLA_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FLA_FLAT = re.compile(r"attn\.(k_k|k_a)$|ffn\.x_k$|_lora\.lora\.2\.bias$")  # (C,) in fla
_FLA_MIX = re.compile(r"attn\.x_[rwkvag]$")  # (1,1,C) in fla


def to_fla(key: str) -> tuple[str, bool] | None:
    """BlinkDL key -> (fla key, transposed); None for a key fla has no place for."""
    if key in _GLOBAL:
        return _GLOBAL[key], False
    m = _BLINK_LAYER.match(key)
    if not m or m.group(2) not in _TO_FLA or key in _OPTIONAL:
        return None
    fla, transposed = _TO_FLA[m.group(2)]
    return f"model.layers.{m.group(1)}.{fla}", transposed


def to_blink(key: str) -> tuple[str, bool] | None:
    """fla key -> (BlinkDL key, transposed); None for a key that is not part of an fla RWKV-7 model."""
    if key in _GLOBAL_BLINK:
        return _GLOBAL_BLINK[key], False
    m = _FLA_LAYER.match(key)
    if not m or m.group(2) not in _TO_BLINK:
        return None
    blink, transposed = _TO_BLINK[m.group(2)]
    return f"blocks.{m.group(1)}.{blink}", transposed


def _fla_tensor(key: str, a: np.ndarray, transposed: bool) -> np.ndarray:
    """A BlinkDL tensor in fla's orientation and shape (a view)."""
    a = a.T if transposed else a
    if _FLA_FLAT.search(key):
        return a.reshape(-1)
    return a.reshape(1, 1, -1) if _FLA_MIX.search(key) else a


class FlaView(Mapping):
    """fla key -> tensor over a BlinkDL state dict; each tensor is made (as a view) when asked for."""

    def __init__(self, raw: Mapping[str, np.ndarray]):
        self.raw = raw
        self.names = {}
        for key in raw:
            mapped = to_fla(key)
            if mapped is not None:
                self.names[mapped[0]] = (key, mapped[1])

    def source(self, key: str) -> tuple[str, np.ndarray]:
        """(BlinkDL key, tensor as the BlinkDL state dict has it) behind fla key ``key``."""
        blink = self.names[key][0]
        return blink, self.raw[blink]

    def __getitem__(self, key: str) -> np.ndarray:
        blink, transposed = self.names[key]
        return _fla_tensor(key, np.asarray(self.raw[blink]), transposed)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


# ---- reading --------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    """A small JSON object file, bounded; refusals name the file."""
    if path.stat().st_size > _JSON_CAP:
        raise CheckpointError(f"{path} is larger than {_JSON_CAP >> 20} MiB; it is not a model config or index.")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # deep nesting: RecursionError
        raise CheckpointError(
            f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:80]}); re-download it."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a JSON {type(obj).__name__}, not an object.")
    return obj


def _check_architecture(folder: Path, config: dict) -> None:
    arch = config.get("architectures")
    if not (isinstance(arch, list) and ARCHITECTURE in arch):
        raise CheckpointError(
            f"{folder / CONFIG}: key 'architectures' is {arch!r}, not ['{ARCHITECTURE}']; "
            "rwkv-opt reads RWKV-7 fla-hub folders (e.g. fla-hub/rwkv7-1.5B-world)."
        )


def _weight_files(folder: Path) -> tuple[dict[str, list[str]] | None, list[str]]:
    """(index's shard -> keys, or None when not sharded; weight file names in name order)."""
    if (folder / INDEX).is_file():
        wmap = _read_json(folder / INDEX).get("weight_map")
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(f"{folder / INDEX}: key 'weight_map' is missing or not a map of file names.")
        shards: dict[str, list[str]] = {}
        for key, shard in wmap.items():
            if Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise CheckpointError(
                    f"{folder / INDEX}: '{key}' points at {shard!r}, which is not a .safetensors file in the folder."
                )
            if not (folder / shard).is_file():
                raise CheckpointError(
                    f"{folder / INDEX}: '{key}' is in shard {shard}, which is missing from "
                    f"{folder}; download every shard."
                )
            shards.setdefault(shard, []).append(key)
        return shards, sorted(shards)
    if (folder / SINGLE).is_file():
        return None, [SINGLE]
    raise CheckpointError(
        f"{folder} has neither {SINGLE} nor {INDEX}; download the safetensors weights "
        "(pytorch_model.bin folders are not read)."
    )


def _read_shard(folder: Path, shard: str, listed: list[str] | None) -> dict[str, np.ndarray]:
    """One weight file of a folder; with an index, its keys must be exactly the ones the index puts there."""
    arrays = read_safetensors(folder / shard)
    if listed is not None:
        for key in listed:
            if key not in arrays:
                raise CheckpointError(
                    f"{folder / INDEX}: says '{key}' is in {shard}, but that file has no such "
                    "tensor; the index does not match the shards."
                )
        extra = sorted(set(arrays) - set(listed))
        if extra:
            raise CheckpointError(
                f"{folder / shard}: holds '{extra[0]}', which {INDEX} does not list there; "
                "the index does not match the shards."
            )
    return arrays


def _to_blink_dict(path: Path, arrays: Mapping[str, np.ndarray], out: dict) -> None:
    """Add `arrays` (fla keys) to `out` under BlinkDL keys and shapes, as views."""
    for key, a in arrays.items():
        mapped = to_blink(key)
        if mapped is None:
            raise CheckpointError(
                f"{path}: tensor '{key}' is not part of an RWKV-7 fla-hub model; "
                "pass a folder of RWKV-7 weights saved by flash-linear-attention."
            )
        blink, transposed = mapped
        a = a.T if transposed else a
        out[blink] = a.reshape(1, 1, -1) if SQUEEZABLE.search(blink) else a


_HF_FIELDS = (
    ("hidden_size", "n_embd"),
    ("num_hidden_layers", "n_layer"),
    ("vocab_size", "vocab"),
    ("head_dim", "head_size"),
    ("num_heads", "n_head"),
    ("intermediate_size", "dim_ffn"),
    ("decay_low_rank_dim", "d_decay"),
    ("a_low_rank_dim", "d_aaa"),
    ("v_low_rank_dim", "d_mv"),
    ("gate_low_rank_dim", "d_gate"),
)
_REQUIRED = ("hidden_size", "num_hidden_layers", "vocab_size")


def check_config(folder: Path, config: dict, cfg: ModelConfig) -> None:
    """config.json must agree with the shapes (fields that are absent or null are not checked)."""
    for field, attr in _HF_FIELDS:
        value = config.get(field)
        if value is None:
            if field in _REQUIRED:
                raise CheckpointError(f"{folder / CONFIG} has no '{field}'; an fla-hub RWKV-7 config has it.")
            continue
        if attr == "d_mv" and cfg.n_layer == 1:
            continue  # a one-layer model has no v LoRA
        if value != getattr(cfg, attr):
            raise CheckpointError(
                f"{folder / CONFIG}: '{field}' is {value!r} but the weights have "
                f"{getattr(cfg, attr)}; the config does not belong to these weights."
            )


def folder_digest(folder: Path, files: list[str]) -> str:
    """See the module docstring: a digest over each listed file's own sha256."""
    lines = "".join(f"{name} {file_digest(folder / name).removeprefix('sha256:')}\n" for name in files)
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def folder_tokenizer(folder: Path) -> dict:
    """Which tokenizer a folder carries: the World vocabulary (checked byte for byte), another, or none."""
    vocab = folder / VOCAB_NAME
    if vocab.is_file():
        same = vocab.read_bytes() == default_vocab_path().read_bytes()
        return {
            "name": WORLD if same else "custom",
            "files": [VOCAB_NAME],
            "evidence": f"{VOCAB_NAME} in the folder {'matches' if same else 'differs from'} the World vocabulary",
        }
    others = [n for n in _TOKENIZER_FILES if (folder / n).is_file()]
    if others:
        return {
            "name": "unknown",
            "files": others,
            "evidence": f"the folder has {', '.join(others)} but no {VOCAB_NAME}",
        }
    return file_tokenizer()


def file_tokenizer() -> dict:
    return {
        "name": WORLD,
        "files": [],
        "evidence": "assumed: no tokenizer files come with the weights, and RWKV-7 releases use the World vocabulary",
    }


def _with_fla_names(msg: str) -> str:
    """A validate() message for a folder: each quoted BlinkDL key becomes "'fla key' (BlinkDL 'key')"."""

    def name(m: re.Match) -> str:
        fla = to_fla(m.group(1))
        return m.group(0) if fla is None else f"'{fla[0]}' (BlinkDL '{m.group(1)}')"

    return re.sub(r"'([\w.]+)'", name, msg)


def _read_hf(folder: Path, digest: bool, finite: bool) -> Weights:
    if not (folder / CONFIG).is_file():
        raise CheckpointError(
            f"{folder} is a folder without {CONFIG}; pass a Hugging Face model folder, "
            "or the .pth/.safetensors file itself."
        )
    config = _read_json(folder / CONFIG)
    _check_architecture(folder, config)
    shards, files = _weight_files(folder)
    raw: dict[str, np.ndarray] = {}
    for shard in files:
        _to_blink_dict(folder / shard, _read_shard(folder, shard, None if shards is None else shards[shard]), raw)
    try:
        cfg = validate(raw, str(folder))
    except CheckpointError as e:
        raise CheckpointError(_with_fla_names(str(e))) from None
    check_config(folder, config, cfg)
    raw = {k: raw[k] for k in expected_shapes(cfg) if k in raw}  # BlinkDL order
    names = [CONFIG] + ([INDEX] if shards is not None else []) + files
    if finite:
        require_finite(raw, str(folder), release=release_pages)
    return Weights(
        raw,
        cfg,
        source=str(folder),
        digest=folder_digest(folder, names) if digest else "",
        layout="hf",
        tokenizer=folder_tokenizer(folder),
    )


def open_checkpoint(path, *, digest: bool = True, finite: bool = True, verify: bool = True) -> Weights:
    """Weights from a .pth, a .safetensors/.st file with BlinkDL keys, or a fla-hub folder.

    ``finite=False`` skips the NaN/inf pass over every weight, and ``verify=False`` a .pth's CRC-32 pass,
    for a caller that makes them itself (``convert``: while it writes, before its output appears)."""
    path = Path(path)
    if path.is_dir():
        return _read_hf(path, digest, finite)
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist; pass a BlinkDL RWKV-7 .pth or .safetensors file, "
            "or a Hugging Face (fla-hub) model folder."
        )
    if not (path.suffix in (".safetensors", ".st") or is_safetensors(path)):
        return dataclasses.replace(
            load_pth(path, digest=digest, finite=finite, verify=verify), layout="pth", tokenizer=file_tokenizer()
        )
    raw = read_safetensors(path)
    cfg = validate(raw, path.name)
    if finite:
        require_finite(raw, path.name, release=release_pages)
    return Weights(
        raw,
        cfg,
        source=str(path),
        digest=file_digest(path) if digest else "",
        layout="safetensors",
        tokenizer=file_tokenizer(),
    )


# ---- writing --------------------------------------------------------------------------------

_DTYPE_NAMES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "float64": "float64"}


def hf_config(cfg: ModelConfig, dtype: np.dtype) -> dict:
    """config.json with fla's RWKV7Config field names (and the ones llama.cpp's converter reads)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "rwkv7",
        "attn_mode": "chunk",
        "hidden_size": cfg.n_embd,
        "hidden_ratio": cfg.dim_ffn / cfg.n_embd,
        "intermediate_size": cfg.dim_ffn,
        "num_hidden_layers": cfg.n_layer,
        "head_dim": cfg.head_size,
        "num_heads": cfg.n_head,
        "decay_low_rank_dim": cfg.d_decay,
        "gate_low_rank_dim": cfg.d_gate,
        "a_low_rank_dim": cfg.d_aaa,
        "v_low_rank_dim": cfg.d_mv,
        "hidden_act": "sqrelu",
        "max_position_embeddings": 2048,
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": 1e-5,
        "attn": None,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "fuse_norm": True,
        "fuse_cross_entropy": True,
        "fuse_linear_cross_entropy": False,
        "use_l2warp": True,
        "vocab_size": cfg.vocab,
        "value_dim": [cfg.n_embd] * cfg.n_layer,
        "torch_dtype": _DTYPE_NAMES.get(str(dtype), "float32"),
    }


def _shards(view: Mapping[str, np.ndarray], max_bytes: int | None) -> list[list[str]]:
    """Keys grouped in order into shards of at most max_bytes (one shard when None)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key in view:
        n = view[key].nbytes
        if max_bytes is not None and groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n
    return groups


def write_hf(
    out: Path,
    weights: Weights,
    max_shard_bytes: int | None = None,
    *,
    check: Callable | None = None,
    before_commit: Callable[[], None] | None = None,
) -> None:
    """An fla-hub folder: config.json, model.safetensors (or shards + index), the tokenizer files.
    ``check(key, array)``: as for ``write_safetensors``, with the BlinkDL key and tensor (as the source has
    them); ``before_commit()``: as for ``write_safetensors``."""
    from rwkv_opt.artifact import write_json
    from rwkv_opt.outdir import staging_dir

    if weights.config.deepembed:
        raise CheckpointError(
            f"{weights.source} is an RWKV-7a (DeepEmbed) model, which has no fla-hub layout "
            "(flash-linear-attention has no DeepEmbed); convert it --to pth or --to safetensors."
        )
    view = FlaView(weights.raw)
    groups = _shards(view, max_shard_bytes)
    fla_check = None if check is None else (lambda key, _: check(*view.source(key)))
    with staging_dir(out) as tmp:
        if len(groups) == 1:
            write_safetensors(tmp / SINGLE, view, _ST_METADATA, check=fla_check)
        else:
            names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
            for name, keys in zip(names, groups):
                write_safetensors(tmp / name, {k: view[k] for k in keys}, _ST_METADATA, check=fla_check)
            total = sum(view[k].nbytes for k in view)
            write_json(
                tmp / INDEX,
                {
                    "metadata": {"total_size": total},
                    "weight_map": {k: n for n, keys in zip(names, groups) for k in keys},
                },
            )
        write_json(tmp / CONFIG, hf_config(weights.config, np.asarray(weights.raw["emb.weight"]).dtype))
        _copy_tokenizer(weights, tmp)
        if before_commit is not None:
            before_commit()


def _copy_tokenizer(weights: Weights, dest: Path) -> None:
    """The source folder's tokenizer files, else the bundled World vocabulary (which llama.cpp reads)."""
    files = weights.tokenizer.get("files", [])
    if weights.layout == "hf" and files:
        for name in files:
            shutil.copyfile(Path(weights.source) / name, dest / name)
    elif weights.tokenizer.get("name") == WORLD:
        shutil.copyfile(default_vocab_path(), dest / VOCAB_NAME)


@contextlib.contextmanager
def _crc_pass(src: Path, layout: str) -> Iterator[Callable[[], None]]:
    """A .pth source's CRC-32 pass (``MappedPth.verify``) on a thread of its own, so the disk reads the source
    while the output is written; yields the wait for it (raising its refusal), which the writer calls before
    its output appears. Other layouts have no CRC: the wait returns at once. Leaving the block waits for the
    pass to end (one read of the file at most), so no thread outlives ``convert``."""
    if layout != "pth":
        yield lambda: None
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rwkv-opt-crc") as pool:
        yield pool.submit(open_pth(src).verify).result


def convert(src, to: str, out, max_shard_bytes: int | None = None) -> Weights:
    """Write checkpoint `src` in layout `to` (pth, safetensors or hf) at `out`; returns its Weights.
    `max_shard_bytes` (hf only): model-0000N-of-0000M.safetensors shards of at most that size, with an index."""
    src, out = Path(src), Path(out)
    if out.exists() and os.path.samefile(src, out):
        raise CheckpointError(f"{out} is the checkpoint being converted; choose another output path.")
    if to not in ("pth", "safetensors", "hf"):
        raise CheckpointError(f"unknown layout '{to}'; choose pth, safetensors or hf.")
    if max_shard_bytes is not None and (to != "hf" or max_shard_bytes < 1):
        raise CheckpointError(
            "a shard size applies to --to hf only and must be at least 1 byte (e.g. --max-shard-size 2GB)."
        )
    weights = open_checkpoint(src, digest=False, finite=False, verify=False)  # both checked while writing
    for a in weights.raw.values():  # opening a cached 1.5B .pth leaves ~400 MB of it resident (measured)
        release_pages(a)
    name = str(src) if src.is_dir() else src.name  # as open_checkpoint names the source in its refusals

    def finite(key: str, a: np.ndarray) -> None:
        require_finite({key: a}, name)

    with _crc_pass(src, weights.layout) as crc_checked:
        if to == "pth":
            write_pth(out, weights.raw, check=finite, before_commit=crc_checked)
        elif to == "safetensors":
            write_safetensors(out, weights.raw, _ST_METADATA, check=finite, before_commit=crc_checked)
        else:
            write_hf(out, weights, max_shard_bytes, check=finite, before_commit=crc_checked)
    return weights
