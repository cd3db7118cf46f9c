"""`rwkv-opt export genai` on the tiny model (RWKV-7, and 7a), run by the real onnxruntime-genai (og.Model,
og.Generator, og.Tokenizer) against rwkv_opt.runtime.Session: greedy tokens and logits on the direct-step (1 token),
Scan (2-31) and chunked-WKV (>= 32, fuse_wkv's min_chunked_len) paths, batch 2, multi-turn, the
tokenizer, the weight file hard link, CUDA exports, and every refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from rwkv_opt.artifact import DATA_FILE, MODEL_FILE
from rwkv_opt.checkpoint.synth import synthetic_state_dict
from rwkv_opt.checkpoint.weights import from_state_dict
from rwkv_opt.export.genai import CONFIG_FILE, export_genai
from rwkv_opt.pipeline import run_pipeline
from rwkv_opt.reference.tokenizer import load_world_tokenizer
from rwkv_opt.runtime import Session
from rwkv_opt.targets import get_target

og = pytest.importorskip("onnxruntime_genai")

CORPUS = Path(__file__).with_name("tokenizer_corpus.json")
NEW_TOKENS = 8
# 1 token: the direct WKV step; 5: the per-token Scan; 40: the chunked WKV (T >= 32)
PROMPT_LENGTHS = (1, 5, 40)


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "rwkv_opt.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny7):
    """target -> (artifact dir, genai dir), built once for the module."""
    root = tmp_path_factory.mktemp("genai")
    deepembed = from_state_dict(synthetic_state_dict("tiny", deepembed=True, seed=7).materialize())
    out = {}
    for name, target, weights in (
        ("cpu-fp32", "cpu-fp32", tiny7),
        ("cpu-int4", "cpu-int4", tiny7),
        ("cuda-fp16", "cuda-fp16", tiny7),
        ("rwkv7a", "cpu-fp32", deepembed),
    ):
        art = root / name
        run_pipeline(get_target(target), weights, art, do_verify=False, progress=lambda _m: None)
        export_genai(art, root / f"{name}-genai")
        out[name] = (art, root / f"{name}-genai")
    return out


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, vocab, n)] for n in PROMPT_LENGTHS]


def session_greedy(session: Session, prompt_rows: list[list[int]], n: int, state=None):
    """Greedy continuation of each row through Session -> (tokens [B, n], logits [n, B, V], state)."""
    logits, state = session.forward(np.array(prompt_rows), state)
    tokens, seen = [], []
    for _ in range(n):
        last = logits[:, -1]
        seen.append(last)
        tokens.append(np.argmax(last, axis=-1))
        logits, state = session.forward(tokens[-1][:, None], state)
    return np.stack(tokens, axis=1), np.stack(seen), state


def genai_greedy(generator, n: int, batch: int = 1):
    """Greedy continuation through og.Generator -> (tokens [B, n], logits [n, B, V]) that picked them."""
    tokens, seen = [], []
    for _ in range(n):
        seen.append(np.array(generator.get_logits()).reshape(batch, -1))
        generator.generate_next_token()
        tokens.append(np.array(generator.get_next_tokens()).reshape(batch))
    return np.stack(tokens, axis=1), np.stack(seen)


def greedy_generator(model, max_length: int, batch: int = 1):
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max_length, batch_size=batch)
    return og.Generator(model, params)


def model_for(genai_dir: Path, cpu: bool = False):
    """og.Model over `genai_dir`; cpu=True drops the config's providers (a CUDA export on this CPU)."""
    if not cpu:
        return og.Model(str(genai_dir))
    config = og.Config(str(genai_dir))
    config.clear_providers()
    return og.Model(config)


@pytest.mark.parametrize("target", ["cpu-fp32", "cpu-int4", "cuda-fp16", "rwkv7a"])
def test_greedy_tokens_and_logits_equal_session(built, target):
    """rwkv7a: the cpu-fp32 target on an RWKV-7a (DeepEmbed) model. genai runs model.onnx as written, so
    Session does too (int8_twins=False: a default Session runs cpu-int4's block GEMMs on int8 twins)."""
    art, genai_dir = built[target]
    session = Session(art, threads=1, int8_twins=False)
    model = model_for(genai_dir, cpu=target.startswith("cuda"))
    for prompt in prompts(session.config.vocab):
        want_tokens, want_logits, _ = session_greedy(session, [prompt], NEW_TOKENS)
        generator = greedy_generator(model, len(prompt) + NEW_TOKENS)
        generator.append_tokens(prompt)
        got_tokens, got_logits = genai_greedy(generator, NEW_TOKENS)
        assert got_tokens.tolist() == want_tokens.tolist(), f"{target}, prompt of {len(prompt)} tokens"
        np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=1e-5)
        assert generator.is_done()  # max_length reached exactly


def test_batch_of_two(built):
    art, genai_dir = built["cpu-fp32"]
    session = Session(art, threads=1)
    rows = np.random.default_rng(1).integers(1, session.config.vocab, (2, 32)).tolist()  # 32: the chunked WKV
    want_tokens, want_logits, _ = session_greedy(session, rows, NEW_TOKENS)
    generator = greedy_generator(og.Model(str(genai_dir)), 32 + NEW_TOKENS, batch=2)
    generator.append_tokens(np.array(rows, dtype=np.int32))
    got_tokens, got_logits = genai_greedy(generator, NEW_TOKENS, batch=2)
    assert got_tokens.tolist() == want_tokens.tolist()
    np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=1e-5)
    assert got_tokens[0].tolist() != got_tokens[1].tolist()  # the rows really are independent sequences


def test_multi_turn_and_rewind(built):
    """Two turns, the state carried over: genai 0.18 never runs the last generated token through the model
    when tokens are appended after it, so the next turn starts with that token again (as the README in
    DIR says); then genai equals Session fed every token once. rewind_to(0) starts afresh."""
    art, genai_dir = built["cpu-fp32"]
    session = Session(art, threads=1)
    first, second, _ = prompts(session.config.vocab, seed=3)
    want1, _, state = session_greedy(session, [first], NEW_TOKENS)  # state has run all of want1
    want2, want_logits2, _ = session_greedy(session, [second], NEW_TOKENS, state)
    generator = greedy_generator(og.Model(str(genai_dir)), len(first) + len(second) + 2 * NEW_TOKENS + 1)
    generator.append_tokens(first)
    got1, _ = genai_greedy(generator, NEW_TOKENS)
    generator.append_tokens([int(got1[0, -1])] + second)
    got2, got_logits2 = genai_greedy(generator, NEW_TOKENS)
    assert got1.tolist() == want1.tolist() and got2.tolist() == want2.tolist()
    np.testing.assert_allclose(got_logits2, want_logits2, rtol=0, atol=1e-5)
    generator.rewind_to(0)
    generator.append_tokens(first)
    again, _ = genai_greedy(generator, NEW_TOKENS)
    assert again.tolist() == want1.tolist()


def test_directory_contents_and_cuda_config(built):
    _, cpu_dir = built["cpu-fp32"]
    _, cuda_dir = built["cuda-fp16"]
    for d in (cpu_dir, cuda_dir):
        assert {MODEL_FILE, CONFIG_FILE, "tokenizer.json", "tokenizer_config.json", "README.md", "manifest.json"} <= {
            p.name for p in d.iterdir()
        }
        model = onnx.load(str(d / MODEL_FILE), load_external_data=False)
        names = [i.name for i in model.graph.input]
        assert names == [
            "input_ids",
            "past_key_values.0.conv_state",
            "past_key_values.0.recurrent_state",
            "past_key_values.1.conv_state",
            "past_key_values.1.recurrent_state",
        ]
        assert [n.op_type for n in model.graph.node if n.name.startswith("/genai/")].count("Split") == 2
        onnx.checker.check_model(str(d / MODEL_FILE))  # the tiny pipeline artifacts hold their weights inline
    cpu, cuda = (json.loads((d / CONFIG_FILE).read_text()) for d in (cpu_dir, cuda_dir))
    assert cpu["model"]["decoder"]["session_options"]["provider_options"] == []
    assert cuda["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    assert cpu["model"]["context_length"] > 0 and cpu["model"]["eos_token_id"] == 0
    search = cpu["search"]
    assert (search["do_sample"], search["temperature"], search["top_p"], search["top_k"]) == (True, 1.0, 0.5, 0)
    readme = (cpu_dir / "README.md").read_text()
    assert "append_tokens" in readme and "presence penalty 2.0" in readme and "```csharp" in readme


@pytest.mark.parametrize("target", ["cuda-bf16", "cuda-int4", "cpu-int8"])
def test_other_targets_export_and_check(tmp_path, tiny7, target):
    """Every other target exports to a valid graph; cpu-int8 also runs in genai (bf16 and the CUDA
    int4 kernels need a GPU, so those two are checked structurally: config and onnx.checker)."""
    art = tmp_path / target
    run_pipeline(get_target(target), tiny7, art, do_verify=False, progress=lambda _m: None)
    export_genai(art, tmp_path / "genai")
    onnx.checker.check_model(str(tmp_path / "genai" / MODEL_FILE), full_check=True)
    providers = json.loads((tmp_path / "genai" / CONFIG_FILE).read_text())["model"]["decoder"]["session_options"]
    assert providers["provider_options"] == ([] if target.startswith("cpu") else [{"cuda": {}}])
    if target == "cpu-int8":
        session = Session(art, threads=1)
        prompt = prompts(session.config.vocab)[2]
        want, _, _ = session_greedy(session, [prompt], NEW_TOKENS)
        generator = greedy_generator(og.Model(str(tmp_path / "genai")), len(prompt) + NEW_TOKENS)
        generator.append_tokens(prompt)
        assert genai_greedy(generator, NEW_TOKENS)[0].tolist() == want.tolist()


def test_cli_external_weights_are_linked_not_copied(tmp_path):
    """`build --external-data` puts the weights in model.onnx.data; the export hard-links that file, runs
    in genai, and re-exporting into the same DIR replaces it (the rules of `pipeline -o`)."""
    art, out = tmp_path / "art", tmp_path / "genai"
    assert cli("build", "--external-data", "--logits", "last", "-o", art).returncode == 0
    for _ in range(2):
        r = cli("export", "genai", art, "-o", out)
        assert r.returncode == 0, r.stderr
    assert os.stat(art / DATA_FILE).st_ino == os.stat(out / DATA_FILE).st_ino
    session = Session(art, threads=1)
    prompt = prompts(session.config.vocab)[1]
    want, _, _ = session_greedy(session, [prompt], NEW_TOKENS)
    generator = greedy_generator(og.Model(str(out)), len(prompt) + NEW_TOKENS)
    generator.append_tokens(prompt)
    assert genai_greedy(generator, NEW_TOKENS)[0].tolist() == want.tolist()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging leftovers


@pytest.mark.parametrize("head", ["sampling", "sft"])
def test_refuses_heads(tmp_path, head):
    art = tmp_path / "art"
    assert cli("pipeline", "--head", head, "--no-verify", "-o", art).returncode == 0
    r = cli("export", "genai", art, "-o", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        f"rwkv-opt: error: {art} carries the '{head}' head, but onnxruntime-genai runs plain "
        "logits models (it samples on the host); export an artifact built without --head."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_refuses_missing_artifact_and_foreign_dir(tmp_path, built):
    r = cli("export", "genai", tmp_path / "nope", "-o", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    r = cli("export", "genai", built["cpu-fp32"][0], "-o", foreign)
    assert r.returncode == 2 and "is not empty" in r.stderr and "Traceback" not in r.stderr
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]


def test_tokenizer_decodes_world_ids_exactly_and_reports_encode_agreement(built):
    """Decoding World ids through og.Tokenizer gives the text back on every corpus entry; encode agreement
    with the World tokenizer is printed and held to what this BPE reached (reports/genai_tokenizer.md)."""
    world = load_world_tokenizer()
    tokenizer = og.Tokenizer(og.Model(str(built["cpu-fp32"][1])))
    texts = [row["text"] for row in json.loads(CORPUS.read_text())]
    assert {row["kind"] for row in json.loads(CORPUS.read_text())} >= {"en", "code", "zh", "ja", "ko", "emoji", "num"}
    decoded = [tokenizer.decode(world.encode(t)) for t in texts]
    assert [d == t for d, t in zip(decoded, texts)] == [True] * len(texts)
    same = ours = theirs = 0
    for t in texts:
        want, got = world.encode(t), list(tokenizer.encode(t))
        same += got == want
        ours, theirs = ours + len(got), theirs + len(want)
        assert world.decode(got) == t  # BPE ids are World ids: any encoding round-trips through World
    print(f"genai tokenizer: {same}/{len(texts)} texts identical, token-count ratio {ours / theirs:.4f}")
    assert same / len(texts) >= AGREEMENT_FLOOR and ours / theirs <= RATIO_CEILING


AGREEMENT_FLOOR, RATIO_CEILING = 0.45, 1.035  # measured 29/60 = 0.48, 1.031 (onnxruntime-genai 0.18.0)
