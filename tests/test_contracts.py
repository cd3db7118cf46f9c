"""The typed contracts other programs rely on: the manifest (artifact.Manifest), the source reference
(artifact.SourceRef) and the model metadata (contract.Meta) -- written and read in one place each."""

import json

import pytest

from rwkv_opt.artifact import MANIFEST_FILE, Manifest, SourceRef
from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph import contract
from rwkv_opt.graph.contract import Key, Meta


def test_manifest_round_trip_keeps_every_field_in_order(tmp_path):
    m = Manifest(
        target="cpu-fp32",
        provider="cpu",
        precision="fp32",
        quantization="none",
        logits="last",
        source={"path": "synthetic:tiny:seed0", "digest": "synthetic:tiny:seed0", "config": {"n_layer": 2}},
        passes=[{"name": "simplify"}],
        heads=["sampling"],
        verification={"status": "passed"},
        extra={"build_seconds": 1.5, "created": "2026-12-05T00:00:00+00:00"},
    )
    m.write(tmp_path)
    d = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert list(d)[:7] == ["tool", "target", "provider", "precision", "quantization", "logits", "source"]
    assert d["tool"] == "rwkv-opt" and d["build_seconds"] == 1.5 and d["verification"] == {"status": "passed"}
    back = Manifest.read(tmp_path)
    assert back == m and back.source_ref == SourceRef("synthetic:tiny:seed0", "synthetic:tiny:seed0", {"n_layer": 2})
    assert back.source_ref.is_synthetic and back.source_ref.locate() is None


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"tool": "other-tool"}, "was not written by rwkv-opt"),
        ({"heads": "sampling"}, "'heads' should be a JSON list"),
        ({"source": []}, "'source' should be a JSON dict"),
        ({"verification": [1]}, "'verification' should be a JSON object"),
    ],
)
def test_manifest_refuses_fields_of_the_wrong_kind(tmp_path, bad, words):
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"tool": "rwkv-opt", "target": "cpu-fp32", **bad}))
    with pytest.raises(RwkvOptError, match=words) as e:
        Manifest.read(tmp_path)
    assert "\n" not in str(e.value)


def test_source_ref_refuses_weights_that_are_not_the_source(tmp_path):
    from rwkv_opt.checkpoint.synth import synthetic_state_dict
    from rwkv_opt.checkpoint.torchzip import write_pth

    write_pth(tmp_path / "a.pth", synthetic_state_dict("tiny", seed=1))
    write_pth(tmp_path / "b.pth", synthetic_state_dict("tiny", seed=2))
    a = SourceRef.synthetic_name("tiny", False, 0)
    assert a == "synthetic:tiny:seed0" and SourceRef(a).load().config.n_layer == 2
    from rwkv_opt.checkpoint.weights import load_weights

    w = load_weights(tmp_path / "a.pth")
    ref = SourceRef(str(tmp_path / "a.pth"), w.digest, w.config.to_dict())
    assert ref.load().digest == w.digest
    with pytest.raises(RwkvOptError, match="is not the checkpoint the artifact was built from"):
        ref.load(tmp_path / "b.pth")
    assert ref.load(tmp_path / "b.pth", same_weights=False).digest != w.digest  # training may start elsewhere
    with pytest.raises(RwkvOptError, match="not on this machine"):
        SourceRef(str(tmp_path / "gone.pth")).locate()
    with pytest.raises(RwkvOptError, match="not on this machine"):  # an empty path is not the current directory
        SourceRef("").locate(beside=tmp_path)


def test_meta_reads_every_key_it_names(tiny7):
    from rwkv_opt.graph.model import build_model

    model = build_model(tiny7)
    meta = Meta.of(model)
    assert set(contract.META_KEYS) <= set(meta.props)
    assert meta.config() == tiny7.config and meta.logits in ("all", "last") and meta.passes == []
    assert meta.precision["weights"] == "fp32" and meta.state_dtypes["wkv"] == "float32"
    assert meta.quantization is None and meta.sampler is None and meta.train == {}
    contract.set_meta(model, Key.CONFIG, "{not json")
    with pytest.raises(RwkvOptError, match="malformed rwkv_opt.config"):
        Meta.of(model).config(where="m.onnx")
    contract.set_meta(model, Key.PRECISION, "[")
    with pytest.raises(RwkvOptError, match="'rwkv_opt.precision' is not valid JSON"):
        Meta.of(model).precision
