"""Train -> .pth -> re-export closes the loop, and the CLI's training path and refusals.

RWKV-7 through the CLI (pipeline --head sft, train --save-graphs, pipeline --checkpoint on the
trained .pth); RWKV-7a through the library. In both, the official package loads the trained
.pth (in a subprocess, `cpu fp32`) and its logits agree with our re-exported graph to
max|err|/std <= 1e-4 with identical argmax, while differing clearly from the untrained model's.
"""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from rwkv_opt.checkpoint import load_source
from rwkv_opt.checkpoint.synth import synthetic_state_dict
from rwkv_opt.checkpoint.weights import from_state_dict, load_weights
from rwkv_opt.config import Precision, Provider
from rwkv_opt.graph.model import build_model
from rwkv_opt.passes.base import PassRefused
from rwkv_opt.pipeline import run_passes, run_pipeline
from rwkv_opt.targets import FP32_BUDGET, Target
from rwkv_opt.training import TrainConfig
from rwkv_opt.training.run import train
from rwkv_testutil import ort_session, run_oracle, zero_feed
from train_helpers import reference_loss

TOL = 1e-4
TEXT = "RWKV trains on stock onnxruntime: one call, one AdamW step."


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "rwkv_opt.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )


def rel(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max() / np.std(b)


def logits_of(model, cfg, tokens):
    sess = ort_session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"x": tokens, **zero_feed(cfg, len(tokens))})))["head"]


def check_against_official(pth, tokens, deepembed, tmp, untrained):
    official = run_oracle(pth, tokens, deepembed, tmp / "oracle.npz")
    w = load_weights(pth)
    ours = logits_of(build_model(w), w.config, tokens)
    for b in range(len(tokens)):
        assert rel(official[f"seq_{b}"], ours[b]) <= TOL
        assert (official[f"seq_{b}"].argmax(-1) == ours[b].argmax(-1)).all()
        assert rel(untrained[b], ours[b]) > 0.1, "training did not change the model"
    print(
        f"trained {w.config.variant.value}: official vs ours max|err|/std "
        f"{max(rel(official[f'seq_{b}'], ours[b]) for b in range(len(tokens))):.2e}, vs untrained "
        f"{min(rel(untrained[b], ours[b]) for b in range(len(tokens))):.2f}"
    )
    return w


def test_cli_sft_train_reexport_official(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"prompt": "Q: ", "text": "short"}) + "\n")
    art, out, art2 = tmp_path / "art", tmp_path / "out", tmp_path / "art2"
    r = cli("pipeline", "--head", "sft", "--no-verify", "-o", art)
    assert r.returncode == 0, r.stderr
    meta = {p.key: p.value for p in onnx.load(str(art / "model.onnx")).metadata_props}
    assert meta["rwkv_opt.train.head"] == "sft" and meta["rwkv_opt.train.seq"] == "64"
    assert "sft" in meta["rwkv_opt.passes"].split(",")

    r = cli(
        "train",
        art,
        "--data",
        data,
        "--steps",
        "20",
        "--lr",
        "3e-3",
        "--seq",
        "40",
        "--batch",
        "2",
        "--save-graphs",
        "--log-every",
        "5",
        "-o",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert "step    20/20" in r.stderr and "loss" in r.stderr and "steps/s" in r.stderr
    assert "eval loss" in r.stdout and "model.pth" in r.stdout
    man = json.loads((out / "manifest.json").read_text())
    assert man["loss"]["eval_after"] <= 0.2 * man["loss"]["eval_before"]
    assert len(man["log"]) == 20 and man["train"]["batch"] == 2 and man["train"]["seq"] == 40
    assert {"model.pth", "train_step.onnx", "eval.onnx", "optimizer_state.npz"} <= {p.name for p in out.iterdir()}

    tokens = np.random.default_rng(4).integers(1, 1024, (2, 24))
    tokens[0, :20] = [b + 1 for b in TEXT.encode()[:20]]
    src = from_state_dict(synthetic_state_dict("tiny", seed=0))
    untrained = logits_of(build_model(src), src.config, tokens)
    w = check_against_official(out / "model.pth", tokens, False, tmp_path, untrained)

    # the saved eval graph (trained weights baked in) agrees with the float64 reference on them
    x = np.zeros((2, 40), np.int64)
    x[0, 1:] = [b + 1 for b in TEXT.encode()[:39]]
    x[1, 1:6] = [b + 1 for b in b"short"]
    mask = (x > 0).astype(np.int64)
    ev = ort_session(onnx.load(str(out / "eval.onnx")))
    loss = ev.run(["loss"], {"x": x, "mask": mask})[0]
    assert abs(float(loss) - reference_loss(w, x, mask)) <= 1e-4 * max(1.0, float(loss))
    # the saved step graph + optimizer state continue training: same loss before its update
    st = dict(np.load(out / "optimizer_state.npz"))
    step = ort_session(onnx.load(str(out / "train_step.onnx")))
    scalars = {
        "lr": 1e-3,
        "step": float(st.pop("step")) + 1,
        "beta1": 0.9,
        "beta2": 0.99,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
    }
    res = step.run(
        ["loss", "grad_norm"], {"x": x, "mask": mask, **st, **{k: np.array(v, np.float32) for k, v in scalars.items()}}
    )
    assert abs(float(res[0]) - float(loss)) <= 1e-5 * max(1.0, float(loss)) and np.isfinite(res[1])

    # re-export the trained checkpoint with the pipeline (verified against the numpy reference)
    r = cli("pipeline", "--checkpoint", out / "model.pth", "--logits", "all", "-o", art2)
    assert r.returncode == 0, r.stderr
    assert "verified vs numpy reference" in r.stdout
    reexported = logits_of(onnx.load(str(art2 / "model.onnx")), w.config, tokens)
    official = dict(np.load(tmp_path / "oracle.npz"))
    for b in range(2):
        assert rel(official[f"seq_{b}"], reexported[b]) <= TOL


def test_library_deepembed_roundtrip(tmp_path):
    src = from_state_dict(synthetic_state_dict("tiny", deepembed=True, seed=2).materialize())
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n")
    m = train(
        src,
        TrainConfig(seq=32, lr=3e-3, trainable="all,!head.weight"),
        data,
        8,
        tmp_path / "out",
        dtype="bf16",
        progress=lambda s: None,
    )
    assert m["loss"]["eval_after"] < m["loss"]["eval_before"]
    tokens = np.random.default_rng(1).integers(1, 1024, (1, 20))
    untrained = logits_of(build_model(src), src.config, tokens)
    w = check_against_official(tmp_path / "out" / "model.pth", tokens, True, tmp_path, untrained)
    assert str(w.raw["emb.weight"].dtype) == "bfloat16"
    assert np.array_equal(
        np.asarray(w.raw["head.weight"], np.float32),
        np.asarray(src.raw["head.weight"]).astype("bfloat16").astype(np.float32),
    )


def _refused(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    msg = r.stderr.strip().splitlines()[-1]  # after any progress lines
    assert msg.startswith("rwkv-opt: error:"), msg
    for w in words:
        assert w in msg, msg


def test_training_head_pass_marks_and_refuses_a_second_head(tiny7):
    base = build_model(tiny7)
    model, records = run_passes(base, [("reinforce", {"seq": 32})], progress=lambda s: None)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["rwkv_opt.train.head"] == "reinforce" and meta["rwkv_opt.train.seq"] == "32"
    assert records[0].changed and records[0].nodes_before == records[0].nodes_after  # the inference graph stays
    with pytest.raises(PassRefused, match="already has the 'reinforce' training head"):
        run_passes(model, [("sft", {})], progress=lambda s: None)


def test_train_refusals(tmp_path, tiny7):
    plain, art = tmp_path / "plain", tmp_path / "art"
    assert cli("build", "-o", plain).returncode == 0
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hi"}) + "\n")
    _refused(cli("train", plain, "--data", data, "-o", tmp_path / "o1"), "no training head", "--head sft")
    bare = Target("bare", Provider.CPU, Precision.FP32, (), FP32_BUDGET, "no passes")
    run_pipeline(bare, load_source(), art, heads=[("reinforce", {})], do_verify=False, progress=lambda s: None)
    _refused(cli("train", art, "--data", data, "-o", tmp_path / "o2"), "d.jsonl:1", "reward")
    data.write_text(json.dumps({"text": "hi", "rewards": [1.0]}) + "\n")
    _refused(cli("train", art, "--data", data, "-o", tmp_path / "o3"), "one number per token", "(2 tokens)")
    data.write_text(json.dumps({"text": "hi", "reward": 1}) + "\n")
    _refused(
        cli("train", art, "--data", data, "--trainable", "blocks.7.*", "-o", tmp_path / "o4"),
        "'blocks.7.*' matches no parameter",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "d.jsonl", "plain"]
