"""Checkpoint layouts (issue 16): BlinkDL .pth, BlinkDL .safetensors and fla-hub folders.

The same tiny synthetic model (RWKV-7 and 7a) in every layout must give bit-identical ONNX
initializers and identical logits; conversions round-trip bit for bit; sharded folders load; and
malformed files and folders are refused in one sentence naming the file (and key).
"""

from __future__ import annotations

import errno
import filecmp
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from onnx import numpy_helper
from rwkv_testutil import cli, ort_session, zero_feed

from rwkv_opt.checkpoint import streamwrite, torchzip_write
from rwkv_opt.checkpoint.layouts import CONFIG, INDEX, SINGLE, WORLD, convert, open_checkpoint, write_hf
from rwkv_opt.checkpoint.safetensors_io import read_safetensors, write_safetensors
from rwkv_opt.checkpoint.synth import synthetic_state_dict
from rwkv_opt.checkpoint.torchzip import read_pth, write_pth
from rwkv_opt.errors import CheckpointError
from rwkv_opt.graph.model import build_model
from rwkv_opt.reference.tokenizer import VOCAB_NAME

UNUSED = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}  # fla has no place for them


@pytest.fixture(scope="module", params=[False, True], ids=["rwkv7", "rwkv7a"])
def layouts(request, tmp_path_factory):
    """{layout: path} of one tiny model; no fla-hub folder for 7a (fla has no DeepEmbed)."""
    d = tmp_path_factory.mktemp("layouts")
    write_pth(d / "m.pth", synthetic_state_dict("tiny", deepembed=request.param, seed=5))
    paths = {"pth": d / "m.pth", "safetensors": d / "m.safetensors"}
    convert(paths["pth"], "safetensors", paths["safetensors"])
    if not request.param:
        paths["hf"] = d / "hf"
        convert(paths["pth"], "hf", paths["hf"])
    return paths


@pytest.fixture(scope="module")
def hf7(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf7")
    write_pth(d / "m.pth", synthetic_state_dict("tiny", seed=9))
    convert(d / "m.pth", "hf", d / "hf")
    return d


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    )


def _initializers(model) -> dict:
    return {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer}


def _logits(model, cfg) -> np.ndarray:
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, (1, 12))
    sess = ort_session(model, optimize=False)
    return sess.run(["head"], {"x": tokens, **zero_feed(cfg, 1)})[0]


def test_every_layout_gives_the_same_graph_and_logits(layouts):
    models = {}
    for layout, path in layouts.items():
        w = open_checkpoint(path)
        assert w.layout == layout and w.digest.startswith("sha256:") and w.tokenizer["name"] == WORLD
        models[layout] = (build_model(w), w.config)
    want = _initializers(models["pth"][0])
    want_logits = _logits(*models["pth"])
    assert len(want) > 40 and np.abs(want_logits).max() > 0.1
    for layout, (model, cfg) in models.items():
        assert cfg == models["pth"][1]
        assert _initializers(model) == want, layout
        assert np.array_equal(_logits(model, cfg), want_logits), layout


def test_round_trips_are_bit_identical(layouts, tmp_path):
    original = read_pth(layouts["pth"])
    (tmp_path / "st").mkdir()
    back = tmp_path / "st" / "m.pth"  # the same stem: torch names the archive folder after it
    convert(layouts["safetensors"], "pth", back)
    assert filecmp.cmp(layouts["pth"], back, shallow=False)  # pth -> safetensors -> pth: the same file
    if "hf" not in layouts:
        return
    convert(layouts["hf"], "pth", tmp_path / "hf.pth")
    again = read_pth(tmp_path / "hf.pth")
    assert set(original) - set(again) == UNUSED and set(again) <= set(original)
    assert all(_same(original[k], again[k]) for k in again)
    assert list(again) == [k for k in original if k not in UNUSED]  # BlinkDL order comes back
    convert(layouts["hf"], "hf", tmp_path / "hf2")  # hf -> hf: the same weights file
    assert filecmp.cmp(layouts["hf"] / SINGLE, tmp_path / "hf2" / SINGLE, shallow=False)


def test_rwkv7a_has_no_fla_hub_layout(tmp_path):
    write_pth(tmp_path / "a.pth", synthetic_state_dict("tiny", deepembed=True))
    with pytest.raises(CheckpointError, match="RWKV-7a.*no fla-hub layout"):
        convert(tmp_path / "a.pth", "hf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth"]


def test_fla_folder_follows_fla_shapes_and_config(hf7):
    """Shapes as fla/layers/rwkv7.py declares them; config fields fla's RWKV7Config and llama.cpp read."""
    t = read_safetensors(hf7 / "hf" / SINGLE)
    C, d = 128, 16
    assert t["model.layers.1.attn.x_r"].shape == (1, 1, C) and t["model.layers.1.attn.k_k"].shape == (C,)
    assert t["model.layers.1.ffn.x_k"].shape == (C,) and t["model.layers.1.attn.w_lora.lora.2.bias"].shape == (C,)
    assert t["model.layers.1.attn.w_lora.lora.0.weight"].shape == (d, C)
    assert t["model.layers.1.attn.w_lora.lora.2.weight"].shape == (C, d)
    assert "model.layers.0.attn.v_lora.lora.0.weight" not in t and "model.layers.0.pre_norm.weight" in t
    assert not any(k.startswith("model.layers.1.pre_norm") for k in t)
    cfg = json.loads((hf7 / "hf" / CONFIG).read_text())
    assert cfg["architectures"] == ["RWKV7ForCausalLM"] and cfg["model_type"] == "rwkv7"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["head_dim"]) == (C, 2, 1024, 64)
    assert (
        cfg["decay_low_rank_dim"],
        cfg["a_low_rank_dim"],
        cfg["v_low_rank_dim"],
        cfg["gate_low_rank_dim"],
        cfg["intermediate_size"],
        cfg["norm_eps"],
        cfg["torch_dtype"],
    ) == (16, 16, 8, 32, 4 * C, 1e-5, "bfloat16")
    assert (hf7 / "hf" / VOCAB_NAME).is_file()  # llama.cpp's _set_vocab_rwkv_world reads it


def test_older_converter_shapes_are_accepted(hf7, tmp_path):
    """Converters that kept (1,1,C) for k_k, k_a, ffn.x_k and the LoRA biases load the same."""
    src = read_safetensors(hf7 / "hf" / SINGLE)
    vector = re.compile(r"attn\.k_[ka]$|ffn\.x_k$|lora\.2\.bias$")
    old = {k: (a.reshape(1, 1, -1) if vector.search(k) else a) for k, a in src.items()}
    assert sum(a.ndim == 3 for a in old.values()) == 2 * (6 + 3 + 2) + 1  # x_*; k_k, k_a, x_k; w0, a0; v0 (layer 1)
    shutil.copytree(hf7 / "hf", tmp_path / "old")
    write_safetensors(tmp_path / "old" / SINGLE, old, {"format": "pt"})
    a, b = open_checkpoint(hf7 / "hf").raw, open_checkpoint(tmp_path / "old").raw
    assert list(a) == list(b) and all(_same(a[k], b[k]) for k in a)


def test_sharded_folder_loads(hf7, tmp_path):
    w = open_checkpoint(hf7 / "hf")
    write_hf(tmp_path / "sh", w, max_shard_bytes=200_000)
    shards = sorted(p.name for p in (tmp_path / "sh").glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "sh" / SINGLE).exists()
    s = open_checkpoint(tmp_path / "sh")
    assert s.layout == "hf" and s.config == w.config and s.digest != w.digest
    assert list(s.raw) == list(w.raw) and all(_same(s.raw[k], w.raw[k]) for k in w.raw)


def test_cli_convert_writes_shards(hf7, tmp_path):
    """`convert --to hf --max-shard-size`: shards of at most that size plus the index; what loads back is the
    same model; a size for another layout or that is not a size is one sentence and writes nothing."""
    out = tmp_path / "sh"
    r = cli("convert", hf7 / "m.pth", "--to", "hf", "-o", out, "--max-shard-size", "0.2MB")
    assert r.returncode == 0, r.stderr
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (out / INDEX).is_file() and not (out / SINGLE).exists()
    index = json.loads((out / INDEX).read_text())["weight_map"]
    assert set(index.values()) == {p.name for p in shards}
    assert all(p.stat().st_size <= 200_000 + 8 + 4096 for p in shards if len(read_safetensors(p)) > 1)
    a, b = open_checkpoint(out).raw, open_checkpoint(hf7 / "hf").raw
    assert list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    for args in (
        ("--to", "pth", "-o", tmp_path / "x.pth", "--max-shard-size", "1MB"),
        ("--to", "hf", "-o", tmp_path / "y", "--max-shard-size", "2QB"),
    ):
        r = cli("convert", hf7 / "m.pth", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "shard" in r.stderr and "size" in r.stderr, r.stderr
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "y").exists()


def test_safetensors_package_reads_ours_and_we_read_its(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    sd = synthetic_state_dict("tiny", seed=2, dtype="fp32")
    write_safetensors(tmp_path / "ours.safetensors", sd)
    theirs = st.load_file(str(tmp_path / "ours.safetensors"))
    assert list(theirs) == list(sd) and all(_same(theirs[k], sd[k]) for k in sd)
    half = synthetic_state_dict("tiny", seed=2, dtype="fp16").materialize()
    st.save_file(half, str(tmp_path / "theirs.st"))
    w = open_checkpoint(tmp_path / "theirs.st")
    assert w.layout == "safetensors" and all(_same(w.raw[k], half[k]) for k in half)


# ---- refusals ---------------------------------------------------------------------------------


def _rewrite_header(path, edit) -> None:
    """Apply `edit` to a safetensors file's header dict and write it back with the same data."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _edit_json(path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _sharded(hf7, dst) -> list[str]:
    """Write a sharded copy of the tiny folder; -> its shard names."""
    write_hf(dst, open_checkpoint(hf7 / "hf"), max_shard_bytes=200_000)
    return sorted(p.name for p in dst.glob("model-*.safetensors"))


def _missing_shard(hf7, d):
    second = _sharded(hf7, d)[1]
    (d / second).unlink()
    return d, [INDEX, second, "'model."]


def _lying_index(hf7, d):
    first = _sharded(hf7, d)[0]
    _edit_json(d / INDEX, lambda o: o["weight_map"].update({"lm_head.weight": first}))
    return d, [INDEX, "'lm_head.weight'", first]


def _wrong_dtype(hf7, d):
    shutil.copytree(hf7 / "hf", d)
    _rewrite_header(d / SINGLE, lambda h: h["lm_head.weight"].update(dtype="I16"))
    return d, [SINGLE, "'lm_head.weight'", "I16"]


def _llama_folder(hf7, d):
    shutil.copytree(hf7 / "hf", d)
    _edit_json(d / CONFIG, lambda o: o.update(architectures=["LlamaForCausalLM"], model_type="llama"))
    return d, [CONFIG, "'architectures'", "LlamaForCausalLM"]


def _rwkv6_folder(hf7, d):
    shutil.copytree(hf7 / "hf", d)
    _edit_json(d / CONFIG, lambda o: o.update(architectures=["RWKV6ForCausalLM"]))
    return d, [CONFIG, "'architectures'", "RWKV6ForCausalLM"]


def _foreign_key(hf7, d):
    shutil.copytree(hf7 / "hf", d)
    t = dict(read_safetensors(hf7 / "hf" / SINGLE))
    t["model.layers.0.attn.q_proj.weight"] = np.zeros((128, 128), ml_dtypes.bfloat16)
    write_safetensors(d / SINGLE, t)
    return d, [SINGLE, "'model.layers.0.attn.q_proj.weight'"]


def _missing_tensor(hf7, d):
    shutil.copytree(hf7 / "hf", d)
    t = dict(read_safetensors(hf7 / "hf" / SINGLE))
    del t["model.layers.1.attn.w_lora.lora.0.weight"]
    write_safetensors(d / SINGLE, t)
    return d, [str(d), "'model.layers.1.attn.w_lora.lora.0.weight' (BlinkDL 'blocks.1.att.w1')"]


def _rwkv6_blink_keys(hf7, d):
    d.mkdir()
    sd = synthetic_state_dict("tiny", dtype="fp32").materialize()
    sd["blocks.0.att.time_maa_x"] = np.zeros((1, 1, 128), np.float32)
    write_safetensors(d / "v6.safetensors", sd)
    return d / "v6.safetensors", ["v6.safetensors", "RWKV-6"]


def _truncated(hf7, d):
    shutil.copytree(hf7 / "hf", d)
    last = list(read_safetensors(d / SINGLE))[-1]
    with open(d / SINGLE, "r+b") as f:
        f.truncate((d / SINGLE).stat().st_size - 100)
    return d, [SINGLE, f"'{last}'", "truncated"]


def _header_beyond_file(hf7, d):
    d.mkdir()
    (d / "x.safetensors").write_bytes(struct.pack("<Q", 1_000_000) + b'{"a": 1}')
    return d / "x.safetensors", ["x.safetensors", "1000000-byte header"]


def _nested_header(hf7, d):
    d.mkdir()
    raw = b"[" * 200_000 + b"]" * 200_000
    (d / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return d / "x.safetensors", ["x.safetensors", "not valid JSON"]


def _overlap(hf7, d):
    def edit(header):
        begin, end = header["lm_head.weight"]["data_offsets"]
        header["lm_head.weight"]["data_offsets"] = [0, end - begin]  # over the first tensor

    shutil.copytree(hf7 / "hf", d)
    _rewrite_header(d / SINGLE, edit)
    return d, [SINGLE, "overlaps"]


def _config_lies(hf7, d):
    shutil.copytree(hf7 / "hf", d)
    _edit_json(d / CONFIG, lambda o: o.update(hidden_size=256))
    return d, [CONFIG, "'hidden_size'", "256", "128"]


def _no_config(hf7, d):
    shutil.copytree(hf7 / "hf", d)
    (d / CONFIG).unlink()
    return d, [str(d), CONFIG]


CASES = [
    _missing_shard,
    _lying_index,
    _wrong_dtype,
    _llama_folder,
    _rwkv6_folder,
    _foreign_key,
    _missing_tensor,
    _rwkv6_blink_keys,
    _truncated,
    _header_beyond_file,
    _nested_header,
    _overlap,
    _config_lies,
    _no_config,
]


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__.strip("_"))
def test_malformed_checkpoints_are_refused_in_one_sentence(hf7, tmp_path, case):
    path, names = case(hf7, tmp_path / "bad")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("."), msg
    for name in names:
        assert name in msg, (name, msg)


# ---- the command line -------------------------------------------------------------------------


def test_cli_convert_build_and_tokenizer_check(hf7, tmp_path):
    out = tmp_path / "hf"
    r = cli("convert", hf7 / "m.pth", "--to", "hf", "-o", out)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out} (hf)" in r.stdout and (out / SINGLE).is_file()
    r = cli("build", out, "-o", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    source = json.loads((tmp_path / "art" / "manifest.json").read_text())["source"]
    assert source["layout"] == "hf" and source["tokenizer"]["name"] == WORLD
    assert source["digest"] == open_checkpoint(out).digest

    (out / VOCAB_NAME).unlink()  # a folder with another tokenizer
    (out / "tokenizer.json").write_text("{}")
    r = cli("build", out, "-o", tmp_path / "other")
    assert r.returncode == 0, r.stderr
    r = cli("generate", tmp_path / "other", "--prompt", "hi", "--max-tokens", "2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "source.tokenizer is 'unknown'" in r.stderr and "tokenizer.json" in r.stderr

    r = cli("convert", tmp_path / "nothing.pth", "--to", "safetensors", "-o", tmp_path / "x.safetensors")
    assert r.returncode == 2 and r.stderr.startswith("rwkv-opt: error:") and "nothing.pth does not exist" in r.stderr
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.safetensors.tmp").exists()


# ---- the one-pass writer (streamwrite.TensorSink): copy_file_range, its fallback, failures ------------


@pytest.fixture
def big_paths(monkeypatch):
    """Tiny tensors take the paths of big ones: 4 KiB chunks (several per tensor), nothing gathered as small."""
    monkeypatch.setattr(streamwrite, "_SMALL", 256)
    monkeypatch.setattr(torchzip_write, "_CHUNK", 4096)


def _spy_copy_range(monkeypatch, fail_at: int | None, err: int | None) -> dict:
    """Count os.copy_file_range calls (the real one runs); call number `fail_at` fails with `err`, as a
    kernel that cannot copy between these files would. -> {"calls": n, "refused": [errno, ...]}."""
    seen: dict = {"calls": 0, "refused": []}
    real = os.copy_file_range

    def spy(*args):
        seen["calls"] += 1
        try:
            if seen["calls"] == fail_at:
                raise OSError(err, os.strerror(err))
            return real(*args)
        except OSError as e:
            seen["refused"].append(e.errno)
            raise

    monkeypatch.setattr(os, "copy_file_range", spy)
    return seen


def _round_trip(src: Path, work: Path, hf: bool) -> None:
    """pth -> safetensors -> pth and (if `hf`) pth -> hf -> pth under `work`; each back file equals `src` byte
    for byte (the hf one up to layer 0's unused v0/v1/v2, which fla has no place for)."""
    for via in ("safetensors", "hf") if hf else ("safetensors",):
        (work / via).mkdir()
        mid = work / via / ("m.safetensors" if via == "safetensors" else "hf")
        convert(src, via, mid)
        convert(mid, "pth", work / via / src.name)
        assert zipfile.ZipFile(work / via / src.name).testzip() is None  # the CRC-32s, checked by zlib itself
        if via == "safetensors":
            assert filecmp.cmp(src, work / via / src.name, shallow=False)
        else:
            original, again = read_pth(src), read_pth(work / via / src.name)
            assert set(original) - set(again) <= UNUSED and all(_same(original[k], again[k]) for k in again)


@pytest.mark.parametrize("fail", [None, errno.EXDEV, errno.ENOSYS, errno.EINVAL], ids=str)
def test_copy_file_range_and_its_fallback_keep_round_trips_bit_identical(
    layouts, tmp_path, monkeypatch, big_paths, fail
):
    """Unchanged bytes go file to file by copy_file_range; when the kernel refuses it (2nd call, mid-file),
    the writer finishes with plain writes and the files are the same bytes as without it."""
    seen = _spy_copy_range(monkeypatch, 2 if fail else None, fail)
    _round_trip(layouts["pth"], tmp_path, "hf" in layouts)
    st = tmp_path / "safetensors" / "m.safetensors"
    assert filecmp.cmp(st, layouts["safetensors"], shallow=False)  # the same file as the plain writer's
    if fail is None:
        assert seen["calls"] > 20 and not seen["refused"]
    else:  # one refusal per conversion, then no more tries in it
        assert seen["refused"] and set(seen["refused"]) == {fail}


def test_copy_across_file_systems_falls_back(layouts, tmp_path, monkeypatch, big_paths):
    """A real EXDEV: the source on tmpfs (/dev/shm), the output elsewhere."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's temp folder")
    seen = _spy_copy_range(monkeypatch, None, None)
    src = Path(shutil.copy(layouts["pth"], shm / f"rwkv-opt-test-{os.getpid()}-m.pth"))
    try:
        convert(src, "safetensors", tmp_path / "m.safetensors")
    finally:
        src.unlink()
    assert seen["refused"] == [errno.EXDEV]
    assert filecmp.cmp(tmp_path / "m.safetensors", layouts["safetensors"], shallow=False)


def test_nan_found_while_copying_is_refused_and_leaves_nothing(tmp_path, monkeypatch, big_paths):
    """convert checks finiteness in its copy pass (open_checkpoint skips its own pass): still one sentence
    naming the key, for every output layout, no temp file left and no writer thread left running."""
    sd = dict(synthetic_state_dict("tiny", seed=3))
    sd["blocks.1.att.key.weight"] = sd["blocks.1.att.key.weight"].copy()
    sd["blocks.1.att.key.weight"].reshape(-1)[5] = np.nan
    write_pth(tmp_path / "nan.pth", sd)
    for to, out in (("safetensors", "o.safetensors"), ("pth", "o.pth"), ("hf", "o")):
        with pytest.raises(CheckpointError, match=r"nan.pth: 'blocks.1.att.key.weight' holds nan at flat index 5"):
            convert(tmp_path / "nan.pth", to, tmp_path / out)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pth"], to
    assert not [t for t in threading.enumerate() if t.name.startswith("rwkv-opt-writer")]


def test_crc_mismatch_found_while_writing_is_refused_and_leaves_nothing(tmp_path, big_paths):
    """convert runs a .pth source's CRC-32 pass beside its writes (open_checkpoint skips its own): a flipped
    mantissa bit (still finite) is refused with the reader's sentence before any output appears."""
    write_pth(tmp_path / "bad.pth", synthetic_state_dict("tiny", seed=4))
    at = streamwrite.mapping_of(read_pth(tmp_path / "bad.pth", verify_crc=False)["blocks.1.att.key.weight"])[1]
    with open(tmp_path / "bad.pth", "r+b") as fh:
        fh.seek(at + 6)
        byte = fh.read(1)[0]
        fh.seek(at + 6)
        fh.write(bytes([byte ^ 1]))
    for to, out in (("safetensors", "o.safetensors"), ("pth", "o.pth"), ("hf", "o")):
        with pytest.raises(CheckpointError, match="bad.pth has a CRC-32 mismatch in"):
            convert(tmp_path / "bad.pth", to, tmp_path / out)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"], to
    assert not [t for t in threading.enumerate() if t.name.startswith(("rwkv-opt-writer", "rwkv-opt-crc"))]


def test_disk_full_midway_is_one_sentence_leaves_nothing_and_does_not_hang(layouts, tmp_path):
    """A 512 KiB tmpfs under a 1.4 MB model: ENOSPC comes from the writer thread mid-file. The CLI must
    end (within the timeout: no thread waits forever), exit 2 with one sentence, and leave the mount empty."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare -rm (user + mount namespaces) to mount a small file system")
    assert layouts["pth"].stat().st_size > 1 << 20
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for to, out in (("safetensors", "o.safetensors"), ("pth", "o.pth")):
        cmd = shlex.join([sys.executable, "-m", "rwkv_opt.cli", "convert", str(layouts["pth"]), "--to", to, "-o"])
        script = (
            f"mount -t tmpfs -o size=512k tmpfs {mnt} && {{ {cmd} {mnt / out}; rc=$?; echo LEFT:$(ls -A {mnt}); "
            "exit $rc; }"
        )
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        r = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (to, r.stdout, r.stderr)
        assert r.stderr.startswith("rwkv-opt: error: cannot write") and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr and r.stdout.strip().endswith("LEFT:"), (to, r.stdout)


def test_source_replaced_after_mapping_is_written_from_the_mapping(tmp_path, monkeypatch, big_paths):
    """The file at the source path is replaced after it was mapped (and checked): copy_file_range would copy
    the new file's bytes, so the sink writes the mapped, checked bytes instead; a file that is the mapped one
    is copied file to file."""
    seen = _spy_copy_range(monkeypatch, None, None)
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 64)
    mapped = np.memmap(src, dtype=np.uint8, mode="r")
    ok = tmp_path / "ok.bin"
    with open(ok, "wb") as fh, streamwrite.TensorSink(fh) as sink:
        sink.write(mapped[:4096])
    assert seen["calls"] >= 1 and ok.read_bytes() == bytes(mapped[:4096])
    other = tmp_path / "other.bin"
    other.write_bytes(b"\xff" * src.stat().st_size)
    os.replace(other, src)  # same path, another file
    calls, out = seen["calls"], tmp_path / "out.bin"
    with open(out, "wb") as fh, streamwrite.TensorSink(fh) as sink:
        sink.write(mapped[:8192])
    assert seen["calls"] == calls and out.read_bytes() == bytes(range(256)) * 32
