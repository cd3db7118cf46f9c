"""Synthetic presets, config derivation, validation, and key-order independence on real files."""

import zipfile

import numpy as np
import pytest

from rwkv_opt.checkpoint.synth import PRESETS, preset_config, synthetic_state_dict
from rwkv_opt.checkpoint.torchzip import write_pth
from rwkv_opt.checkpoint.weights import file_digest, from_state_dict, load_weights
from rwkv_opt.config import Variant, config_from_shapes, expected_shapes
from rwkv_opt.errors import CheckpointError
from rwkv_opt.reference import ReferenceModel

PARAMS = {"0.1b": 191_084_544, "0.4b": 450_834_432, "1.5b": 1_527_668_736, "2.9b": 2_948_065_280}


@pytest.mark.parametrize("name", list(PARAMS))
def test_released_shapes_param_counts(name):
    cfg = preset_config(name)
    assert cfg.n_params() == PARAMS[name]
    assert config_from_shapes(expected_shapes(cfg)) == cfg
    de = preset_config(name, deepembed=True)
    assert config_from_shapes(expected_shapes(de)) == de and de.variant is Variant.RWKV7A


def test_synthetic_is_deterministic_and_order_free():
    a = synthetic_state_dict("tiny", seed=3)
    b = synthetic_state_dict("tiny", seed=3)
    keys = list(a)
    assert np.array_equal(a[keys[-1]].view(np.uint16), b[keys[-1]].view(np.uint16))  # order of access irrelevant
    c = synthetic_state_dict("tiny", seed=4)
    assert not np.array_equal(a["head.weight"].view(np.uint16), c["head.weight"].view(np.uint16))


@pytest.mark.parametrize("deepembed", [False, True])
def test_synthetic_carries_signal(deepembed):
    sd = synthetic_state_dict("tiny", deepembed=deepembed, dtype="fp32")
    for k in sd:
        assert np.abs(sd[k]).max() > 0, f"{k} is all zeros"
    w = from_state_dict(sd.materialize())
    logits, _ = ReferenceModel(w).forward(np.arange(40) * 17 % 1024)
    assert 1.5 < logits.std(-1).mean() < 4.0


def test_sorted_and_shuffled_files_give_the_same_model(tmp_path):
    sd = synthetic_state_dict("tiny", seed=2).materialize()
    keys = list(sd)
    rng = np.random.default_rng(0)
    orders = {"as_is": keys, "sorted": sorted(keys), "shuffled": list(rng.permutation(keys))}
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    results = {}
    for name, order in orders.items():
        p = tmp_path / name / "model.pth"
        write_pth(p, {k: sd[k] for k in order})
        w = load_weights(p)
        assert w.config.n_layer == 2
        results[name] = ReferenceModel(w).forward(tokens)[0]
    assert np.array_equal(results["as_is"], results["sorted"])
    assert np.array_equal(results["as_is"], results["shuffled"])


def test_fp16_and_fp32_files_load(tmp_path):
    for dtype in ("fp16", "fp32"):
        p = tmp_path / f"{dtype}.pth"
        write_pth(p, synthetic_state_dict("tiny", dtype=dtype))
        assert load_weights(p).config == PRESETS["tiny"]


def test_unexpected_key_is_named():
    sd = synthetic_state_dict("tiny").materialize()
    sd["blocks.0.att.time_mystery"] = sd["blocks.0.att.x_r"]
    with pytest.raises(CheckpointError, match="unexpected key 'blocks.0.att.time_mystery'"):
        from_state_dict(sd)


def test_layer_gap_is_named():
    sd = synthetic_state_dict("tiny").materialize()
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    sd.update({k.replace("blocks.0.", "blocks.2.", 1): v for k, v in sd.items() if k.startswith("blocks.0.")})
    with pytest.raises(CheckpointError, match="none for block 1"):
        from_state_dict(sd)


def test_one_read_makes_the_digest_and_checks_every_crc(tmp_path):
    """load_weights' sha256 comes from the same read as the CRC check and equals a plain hash of the file."""
    p = tmp_path / "model.pth"
    write_pth(p, synthetic_state_dict("tiny", seed=1))
    w = load_weights(p)
    assert w.digest == file_digest(p) and load_weights(p, digest=False).digest == ""
    raw = p.read_bytes()
    with zipfile.ZipFile(p) as zf:
        sid = zf.read("model/.data/serialization_id")  # 40 digits torch only logs: no tensor depends on it
    p.write_bytes(raw.replace(sid, sid[::-1]))
    assert load_weights(p).digest not in ("", w.digest)  # the digest covers every byte, not only the tensors
