"""`rwkv-opt export genai`: an artifact rewired into a directory that onnxruntime-genai runs as is.

onnxruntime-genai's generic "decoder" model carries a fixed-size recurrent state (RecurrentState):
per layer exactly one rank-3 `past_key_values.{i}.conv_state` and one rank-4
`past_key_values.{i}.recurrent_state` (and `present.{i}.*` outputs), only the batch dynamic. RWKV
keeps three states per layer, so the two token-shift states are packed into one [B, 2, C] tensor:

    past_key_values.{i}.conv_state [B,2,C] -Split(axis 1)-> x_tmix_last_{i}, x_cmix_last_{i}
    x_tmix_next_{i}, x_cmix_next_{i} -Concat(axis 1)-> present.{i}.conv_state [B,2,C]
    wkv_state_{i} -> past_key_values.{i}.recurrent_state;  wkv_next_{i} -> present.{i}.recurrent_state
    x -> input_ids;  head -> logits

A single Split reads the whole packed input before anything of the layer runs, so the rewiring stays
right when genai binds the past and present buffers to the same memory (past_present_share_buffer).
The model is loaded without its external weights and only its graph is rewired; the weight file is
hard-linked into the output (or copied in chunks across filesystems), never held in memory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from rwkv_opt.graph.contract import Genai, Key, Meta
from rwkv_opt import __version__
from rwkv_opt.artifact import MANIFEST_FILE, MODEL_FILE, artifact_size, model_path, read_manifest, write_json
from rwkv_opt.outdir import staging_dir
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.export.genai_readme import render
from rwkv_opt.export.tokenizer_bpe import write_tokenizer
from rwkv_opt.graph import contract
from rwkv_opt.onnx_util import weightless
from rwkv_opt.reference.sampler import SamplingParams

CONFIG_FILE = "genai_config.json"
README_FILE = "README.md"
INPUT_IDS, LOGITS = Genai.INPUT_IDS, Genai.LOGITS
PAST_CONV, PAST_RECURRENT = Genai.PAST_CONV, Genai.PAST_RECURRENT
PRESENT_CONV, PRESENT_RECURRENT = Genai.PRESENT_CONV, Genai.PRESENT_RECURRENT
SPLIT_SIZES = "/genai/conv_split_sizes"
CONTEXT_LENGTH = 1 << 20  # RWKV has no context limit; genai needs a positive bound on sequence length
MAX_LENGTH = 4096  # default generation bound (prompt + new tokens), changeable per request
COPY_CHUNK = 64 << 20  # a weight file copied across filesystems goes through a buffer this large
END_OF_DOC = 0  # World token 0 ends a document: eos, and the pad genai needs
UNLIMITED_TOP_K = 0  # the model card's top_k 0: no top-k limit
GENAI_VERSION = "0.18.0"  # the onnxruntime-genai release this layout and config were verified with (tests/export)


def export_genai(artifact: Path, out: Path) -> dict:
    """Write DIR `out` for og.Model(out) from rwkv-opt artifact `artifact` -> the export record."""
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise RwkvOptError(
            f"artifact directory {artifact} does not exist; pass a directory made by "
            "`rwkv-opt pipeline` or `rwkv-opt build`."
        )
    manifest = read_manifest(artifact)
    model = onnx.load(str(model_path(artifact)), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    _refuse_heads(artifact, manifest, meta)
    config = Meta(meta).config(where=str(model_path(artifact))).to_dict()
    rewire(model, config["n_layer"])
    onnx.checker.check_model(weightless(model))  # the graph alone: the checker refuses hard-linked data
    provider = manifest.get("provider", "cpu")
    with staging_dir(out) as tmp:
        weights = {location: _link_or_copy(artifact / location, tmp / location) for location in _data_files(model)}
        onnx.save_model(model, str(tmp / MODEL_FILE))
        write_json(tmp / CONFIG_FILE, genai_config(config, provider))
        write_tokenizer(tmp)
        (tmp / README_FILE).write_text(render(manifest.get("target", "?"), provider, MAX_LENGTH))
        record = {
            "tool": "rwkv-opt",
            "export": "genai",
            "source": str(artifact.absolute()),
            "target": manifest.get("target"),
            "provider": provider,
            "rwkv_opt": __version__,
            "verified_with_onnxruntime_genai": GENAI_VERSION,
            "config": config,
            "weight_files": weights,
            "artifact_bytes": artifact_size(artifact),
            "export_bytes": _dir_bytes(tmp),
        }
        write_json(tmp / MANIFEST_FILE, record)
    return record


def _refuse_heads(artifact: Path, manifest: dict, meta: dict[str, str]) -> None:
    """One sentence when the model is not a plain logits model: genai samples on the host."""
    if Key.CONFIG not in meta:
        raise RwkvOptError(
            f"{artifact / MODEL_FILE} has no rwkv-opt metadata; export an artifact made by "
            "`rwkv-opt pipeline` or `rwkv-opt build`."
        )
    heads = list(manifest.get("heads") or [])
    heads += [meta[k] for k in (Key.SAMPLER, Key.TRAIN + "head") if k in meta]
    if heads:
        raise RwkvOptError(
            f"{artifact} carries the '{heads[0]}' head, but onnxruntime-genai runs plain logits "
            "models (it samples on the host); export an artifact built without --head."
        )


def rewire(model: onnx.ModelProto, n_layer: int) -> None:
    """Rewire `model`'s graph in place into genai's I/O layout (see the module docstring)."""
    g = model.graph
    names = [i.name for i in g.input]
    expected = [contract.TOKENS] + [n for i in range(n_layer) for n in contract.state_inputs(i)]
    if sorted(names) != sorted(expected):
        extra = sorted(set(names) - set(expected)) or sorted(set(expected) - set(names))
        raise RwkvOptError(
            f"the model's inputs differ from rwkv-opt's contract at {extra[:3]}; export an "
            "artifact made by `rwkv-opt pipeline` or `build` without heads."
        )
    _rename(g, contract.TOKENS, INPUT_IDS)
    _rename(g, contract.LOGITS, LOGITS)
    inputs, outputs = {i.name: i for i in g.input}, {o.name: o for o in g.output}
    g.initializer.append(helper.make_tensor(SPLIT_SIZES, TensorProto.INT64, [2], [1, 1]))
    splits, concats = [], []
    for i in range(n_layer):
        tmix, wkv, cmix = contract.state_inputs(i)
        tmix_next, wkv_next, cmix_next = contract.state_outputs(i)
        _rename(g, wkv, PAST_RECURRENT % i)
        _rename(g, wkv_next, PRESENT_RECURRENT % i)
        shift = inputs[tmix].type.tensor_type
        packed = ["batch", 2, shift.shape.dim[2].dim_value]
        for field, pair, name in (
            (g.input, (inputs[tmix], inputs[cmix]), PAST_CONV % i),
            (g.output, (outputs[tmix_next], outputs[cmix_next]), PRESENT_CONV % i),
        ):
            for vi in pair:
                field.remove(vi)
            field.append(helper.make_tensor_value_info(name, shift.elem_type, packed))
        splits.append(
            helper.make_node("Split", [PAST_CONV % i, SPLIT_SIZES], [tmix, cmix], axis=1, name=f"/genai/split_conv_{i}")
        )
        concats.append(
            helper.make_node(
                "Concat", [tmix_next, cmix_next], [PRESENT_CONV % i], axis=1, name=f"/genai/concat_conv_{i}"
            )
        )
    _order_io(g, n_layer)
    nodes = splits + list(g.node) + concats  # Splits read graph inputs only, Concats the last producers
    del g.node[:]
    g.node.extend(nodes)


def _rename(g: onnx.GraphProto, old: str, new: str) -> None:
    """Rename value `old` of the top-level graph `g`: its producer, consumers, graph I/O and value_info,
    and outer-scope references inside subgraphs (If branches, Scan bodies) that do not define it."""
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name == old:
            vi.name = new
    for node in g.node:
        node.output[:] = [new if v == old else v for v in node.output]
    _rename_uses(g, old, new)


def _rename_uses(g: onnx.GraphProto, old: str, new: str) -> None:
    """Rename the uses of outer value `old` in `g` and its subgraphs, stopping where a scope defines it."""
    for node in g.node:
        node.input[:] = [new if v == old else v for v in node.input]
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                if not _defines(sub, old):
                    _rename_uses(sub, old, new)
                    for o in sub.output:  # a branch may return the outer value itself
                        if o.name == old:
                            o.name = new


def _defines(g: onnx.GraphProto, name: str) -> bool:
    return any(v.name == name for v in list(g.input) + list(g.initializer)) or any(name in n.output for n in g.node)


def _order_io(g: onnx.GraphProto, n_layer: int) -> None:
    """Graph inputs and outputs in genai's order: tokens/logits first, then per layer conv, recurrent."""
    for field, first, conv, recurrent in (
        (g.input, INPUT_IDS, PAST_CONV, PAST_RECURRENT),
        (g.output, LOGITS, PRESENT_CONV, PRESENT_RECURRENT),
    ):
        order = [first] + [n % i for i in range(n_layer) for n in (conv, recurrent)]
        by_name = {v.name: v for v in field}
        values = [by_name[n] for n in order]
        del field[:]
        field.extend(values)


def _data_files(model: onnx.ModelProto) -> list[str]:
    """Relative paths of the external-data files `model`'s tensors (subgraphs included) point at."""
    from onnx.external_data_helper import _get_all_tensors

    locations = set()
    for t in _get_all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            location = next(e.value for e in t.external_data if e.key == "location")
            if Path(location).name != location:
                raise RwkvOptError(
                    f"tensor {t.name} points at weight file {location!r} outside the artifact "
                    "directory; re-save the artifact with `rwkv-opt pipeline`."
                )
            locations.add(location)
    return sorted(locations)


def _link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link `src` to `dst` (no bytes copied), or copy it in chunks when they are on different
    filesystems or the filesystem has no hard links -> "hard link" or "copy"."""
    if not src.is_file():
        raise RwkvOptError(
            f"{src.parent / MODEL_FILE} needs weight file {src.name}, which is missing; "
            "re-run `rwkv-opt pipeline` for this artifact."
        )
    try:
        os.link(src, dst)
        return "hard link"
    except OSError:
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            shutil.copyfileobj(fi, fo, COPY_CHUNK)
        return "copy"


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def genai_config(config: dict, provider: str) -> dict:
    """genai_config.json for the rewired model: type "decoder" with RecurrentState's 0.18 name keys."""
    heads = config["n_embd"] // config["head_size"]
    return {
        "model": {
            "type": "decoder",
            "context_length": CONTEXT_LENGTH,
            "vocab_size": config["vocab"],
            "bos_token_id": END_OF_DOC,
            "eos_token_id": END_OF_DOC,
            "pad_token_id": END_OF_DOC,
            "decoder": {
                "filename": MODEL_FILE,
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "provider_options": [{"cuda": {}}] if provider == "cuda" else [],
                },
                "hidden_size": config["n_embd"],
                "num_attention_heads": heads,
                "num_key_value_heads": heads,
                "head_size": config["head_size"],
                "num_hidden_layers": config["n_layer"],
                "inputs": {
                    "input_ids": INPUT_IDS,
                    "past_conv_names": PAST_CONV,
                    "past_recurrent_names": PAST_RECURRENT,
                },
                "outputs": {
                    "logits": LOGITS,
                    "present_conv_names": PRESENT_CONV,
                    "present_recurrent_names": PRESENT_RECURRENT,
                },
            },
        },
        "search": search_defaults(),
    }


def search_defaults() -> dict:
    """The RWKV-7 G1 model card's sampling, as far as genai's search options express it: temperature and
    top-p. Its presence/frequency penalties with decay have no genai option (genai's repetition_penalty
    divides logits instead), so they are off; top_k 0 in the card means no top-k limit."""
    g1 = SamplingParams()
    return {
        "do_sample": True,
        "num_beams": 1,
        "num_return_sequences": 1,
        "max_length": MAX_LENGTH,
        "min_length": 0,
        "temperature": g1.temperature,
        "top_p": g1.top_p,
        "top_k": UNLIMITED_TOP_K,
        "repetition_penalty": 1.0,
        "past_present_share_buffer": False,
        "early_stopping": True,
    }
