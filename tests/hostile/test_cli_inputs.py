"""Hostile and careless INPUTS on the runtime side: corrupt or tampered artifacts, non-finite logits,
malformed baselines, runtime ids and states, bad UTF-8, option values out of range, train data errors.
Each refusal: exit 2 (or RwkvOptError for the library), one sentence, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_harness import REPO, built, refused, run_main, run_proc, snapshot
from rwkv_opt.errors import RwkvOptError

TINY_BASELINE = REPO / "reports" / "baselines" / "tiny.json"


@pytest.fixture
def art(tmp_path, tmp_path_factory) -> Path:
    """A fresh copy of the tiny base artifact (sealed: its manifest records each file's sha256)."""
    return Path(shutil.copytree(built(tmp_path_factory, "base"), tmp_path / "art"))


def _flip_weight_byte(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) * 2 // 3] ^= 0x01  # inside the weights: the model still loads, its numbers are wrong
    path.write_bytes(bytes(b))


# ---- tampered and corrupt artifacts ------------------------------------------------------------------------


def test_inspect_verify_detects_a_flipped_weight_bit(art, tmp_path):
    _flip_weight_byte(art / "model.onnx")
    refused(lambda: run_main("inspect", "--verify", art), "model.onnx does not match the sha256", tree=tmp_path)


def test_session_verify_detects_tampering(art):
    from rwkv_opt.runtime import Session

    _flip_weight_byte(art / "model.onnx")
    Session(art)  # without verify the damage is silent: that is what verify is for
    with pytest.raises(RwkvOptError, match="model.onnx does not match the sha256"):
        Session(art, verify=True)


def test_check_detects_tampering_before_measuring(art, tmp_path):
    _flip_weight_byte(art / "model.onnx")
    refused(
        lambda: run_main("check", "--baseline", TINY_BASELINE, art),
        "does not match the sha256",
        tree=tmp_path,
        seconds=10,
    )


def test_truncated_model_is_one_sentence(art, tmp_path):
    (art / "model.onnx").write_bytes((art / "model.onnx").read_bytes()[:5000])
    refused(lambda: run_main("generate", art, "--prompt", "hi"), "model.onnx", tree=tmp_path)


def test_missing_external_data(tmp_path, tmp_path_factory):
    art = Path(shutil.copytree(built(tmp_path_factory, "external"), tmp_path / "art"))
    (art / "model.onnx.data").unlink()
    refused(lambda: run_main("generate", art, "--prompt", "hi"), "model.onnx.data is missing", tree=tmp_path)
    refused(lambda: run_main("inspect", "--verify", art), "model.onnx.data is missing", tree=tmp_path)


@pytest.mark.parametrize(
    "content,words",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"[" * 100000, "nests too deeply"),
    ],
    ids=["not-json", "list", "not-utf8", "deep"],
)
def test_bad_manifest(art, tmp_path, content, words):
    (art / "manifest.json").write_bytes(content)
    refused(lambda: run_main("inspect", art), "manifest.json", words, tree=tmp_path, seconds=10)


def test_manifest_files_entry_escaping_the_artifact(art, tmp_path):
    man = json.loads((art / "manifest.json").read_text())
    man["files"] = {"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}
    (art / "manifest.json").write_text(json.dumps(man))
    refused(lambda: run_main("inspect", "--verify", art), "malformed entry", tree=tmp_path)


# ---- non-finite logits ---------------------------------------------------------------------------------------


def test_generate_refuses_nan_logits_instead_of_printing_nothing(tmp_path, tmp_path_factory):
    nan = built(tmp_path_factory, "nan")
    refused(
        lambda: run_main("generate", nan, "--prompt", "hi", "--max-tokens", "3"), "non-finite logits", tree=nan.parent
    )


def test_verification_refuses_nan_logits(tmp_path_factory):
    from rwkv_opt.bench.accuracy import compare_recorded, reference_record
    from rwkv_opt.checkpoint import load_source
    from rwkv_opt.reference import ReferenceModel
    from rwkv_opt.runtime import Session

    rec = reference_record(ReferenceModel(load_source(), np.float32), 6, 4, all_prompt=True)
    with pytest.raises(RwkvOptError, match=r"the artifact produced non-finite logits \(NaN or inf\) at 6 of 6 "):
        compare_recorded(Session(built(tmp_path_factory, "nan")), rec)


def test_nan_metric_in_the_artifact_is_a_regression(tmp_path_factory, tmp_path):
    """A sealed artifact whose logits are NaN: `check` measures NaN figures and fails the gate (exit 1)."""
    nan = built(tmp_path_factory, "nan")
    b = tmp_path / "b.json"
    doc = json.loads(TINY_BASELINE.read_text())
    doc["protocol"].update(prompt_len=4, decode=4, batch=1)  # a short protocol keeps the test fast
    b.write_text(json.dumps(doc))
    rc, out, err = run_main("check", "--baseline", b, nan)
    assert rc == 1 and "REGRESSION" in out and "nan" in out, out + err


# ---- malformed baselines -------------------------------------------------------------------------------------


def _baseline(tmp_path, edit) -> Path:
    doc = json.loads(TINY_BASELINE.read_text())
    edit(doc)
    p = tmp_path / "baseline.json"
    p.write_text(json.dumps(doc))  # json.dumps writes NaN and Infinity as Python's json reads them
    return p


def _entry(doc):
    return doc["artifacts"]["base-fp32"]


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda d: _entry(d)["metrics"].update(max_rel_err=float("nan")), "no finite number for metric 'max_rel_err'"),
        (lambda d: _entry(d)["metrics"].update(top1=float("inf")), "no finite number for metric 'top1'"),
        (lambda d: _entry(d)["metrics"].update(mean_kl=True), "no finite number for metric 'mean_kl'"),
        (lambda d: _entry(d)["metrics"].update(top1="1.0"), "no finite number for metric 'top1'"),
        (lambda d: _entry(d)["tolerances"]["max_rel_err"].update(rel=float("inf")), "no valid tolerance"),
        (lambda d: d["protocol"].update(decode=10**9), "no valid protocol"),
        (lambda d: d["protocol"].update(batch=True), "no valid protocol"),
        (lambda d: _entry(d).update(config={**_entry(d).get("config", {}), "n_layer": 12}), "another model shape"),
        (lambda d: _entry(d).update(source="sha256:" + "1" * 64), "compare artifacts of the same checkpoint"),
    ],
    ids=[
        "nan",
        "inf",
        "bool",
        "string",
        "inf-tolerance",
        "huge-protocol",
        "bool-protocol",
        "other-model",
        "other-checkpoint",
    ],
)
def test_malformed_baseline_is_refused(art, tmp_path, edit, words):
    b = _baseline(tmp_path, edit)
    refused(lambda: run_main("check", "--baseline", b, art), words, tree=tmp_path, seconds=10)


# ---- runtime inputs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from rwkv_opt.runtime import Session

    return Session(built(tmp_path_factory, "base"))


@pytest.mark.parametrize(
    "tokens,words",
    [
        (np.array([[1.7, 2.2]]), "must be integers, got float64"),
        ([1.0, 2.0], "must be integers"),
        (np.zeros((1, 2, 3), np.int64), "shape (batch, seq)"),
        ([[1, 2], [3]], "rectangular"),
        (np.array([[True, False]]), "must be integers, got bool"),
        ([[5000]], "in [0, 1024)"),
    ],
)
def test_forward_refuses_bad_token_ids(session, tokens, words):
    with pytest.raises(RwkvOptError, match=None) as e:
        session.forward(tokens)
    assert words in str(e.value) and str(e.value).count("\n") == 0


def test_state_batch_must_equal_token_batch(session):
    state = session.zero_state(2)
    with pytest.raises(RwkvOptError, match="has batch 2 but the tokens have batch 1"):
        session.forward([[1, 2]], state)


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda st: st.update({k: v.astype(np.float64) for k, v in st.items()}), "must be a float32 array"),
        (lambda st: st.pop(next(iter(st))), "state lacks"),
        (lambda st: st.update(bogus=np.zeros(1, np.float32)), "'bogus', which is not a state input"),
        (
            lambda st: st.update({k: v[..., :1] for k, v in st.items() if k.startswith("wkv")}),
            "of shape (1, 2, 64, 64)",
        ),
    ],
    ids=["dtype", "missing", "extra", "shape"],
)
def test_state_must_match_the_model(session, edit, words):
    _, state = session.forward([[1, 2]])
    edit(state)
    with pytest.raises(RwkvOptError) as e:
        session.forward([[3]], state)
    assert words in str(e.value)


# ---- bad UTF-8 and option values -------------------------------------------------------------------------------


def test_prompt_with_invalid_utf8(art, tmp_path):
    refused(
        lambda: run_proc("generate", art, "--prompt", b"caf\xe9 au lait"), "--prompt is not valid UTF-8", tree=tmp_path
    )


def test_chat_stdin_with_invalid_utf8(art, tmp_path):
    refused(
        lambda: run_proc("chat", art, "--max-tokens", "2", stdin=b"hello\n\xff\xfeoops\n"),
        "line 2 of the chat input is not valid UTF-8",
        tree=tmp_path,
    )


@pytest.mark.parametrize(
    "args,words",
    [
        (["build", "--opset", "99"], "--opset must be between 18 and"),
        (["build", "--opset", "11"], "--opset must be between 18 and"),
        (["generate", "ART", "--prompt", "x", "--max-tokens", "0"], "--max-tokens must be between 1"),
        (["generate", "ART", "--prompt", "x", "--temperature", "nan"], "--temperature must be a finite number"),
        (["generate", "ART", "--prompt", "x", "--top-p", "-1"], "--top-p must be a finite number >= 0"),
        (["train", "ART", "--data", "D", "--seq", "100000"], "--seq must be between 2 and 16384, got 100000"),
        (["train", "ART", "--data", "D", "--log-every", "0"], "--log-every must be at least 1, got 0"),
        (["train", "ART", "--data", "D", "--lr", "inf"], "--lr must be a finite number > 0"),
        (["train", "ART", "--data", "D", "--beta2", "1"], "--beta2 must be a finite number in [0, 1)"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else None,
)
def test_option_out_of_range(art, tmp_path, args, words):
    args = [str(art) if a == "ART" else str(tmp_path / "d.jsonl") if a == "D" else a for a in args]
    refused(
        lambda: run_main(*args, "-o", tmp_path / "out") if args[0] in ("build", "train") else run_main(*args),
        words,
        tree=tmp_path,
        seconds=10,
    )


# ---- train data ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines,words",
    [
        (
            b'{"text": "ok", "reward": 1}\n{"text": "abc", "rewards": ["a", "b", "c"]}\n',
            'd.jsonl:2: "rewards"[0] is "a"',
        ),
        (b'{"text": "ok", "reward": NaN}\n', 'd.jsonl:1: a REINFORCE row needs "reward" (finite number)'),
        (b'{"segments": [{"text": "a", "reward": "high"}]}\n', 'd.jsonl:1: "segments" must be a list'),
        (b'{"text": "ok", "reward": 1}\n\n{"text": "caf\xe9", "reward": 1}\n', "d.jsonl:3: not UTF-8 text (byte 0xe9"),
        (b'{"text": "ok", "reward": 1}\n{"text": \n', "d.jsonl:2: not valid JSON"),
    ],
    ids=["rewards-strings", "reward-nan", "segment-string", "bad-utf8", "bad-json"],
)
def test_train_data_errors_name_file_and_line(tmp_path, tmp_path_factory, lines, words):
    data = tmp_path / "d.jsonl"
    data.write_bytes(lines)
    before = snapshot(tmp_path)
    refused(
        lambda: run_main(
            "train", built(tmp_path_factory, "reinforce"), "--data", data, "--steps", "1", "-o", tmp_path / "out"
        ),
        words,
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "config",
    ['{"n_layer": 2', '{"n_layer": "2"}', "[1]", '{"bogus": 1}'],
    ids=["not-json", "string-size", "list", "unknown-key"],
)
def test_malformed_config_metadata(art, tmp_path, config):
    """A model whose rwkv_opt.config metadata is not a model config: generate and inspect refuse it."""
    import onnx

    m = onnx.load(str(art / "model.onnx"))
    next(p for p in m.metadata_props if p.key == "rwkv_opt.config").value = config
    onnx.save(m, str(art / "model.onnx"))
    refused(lambda: run_main("generate", art, "--prompt", "x"), "malformed rwkv_opt.config", tree=tmp_path)
    refused(lambda: run_main("inspect", art), "malformed rwkv_opt.config", tree=tmp_path)
