"""benchmarks/llamacpp.py and peers.py's llama.cpp parts that need no llama.cpp build: finding a build,
the command lines, llama-bench JSON -> rows, the World-vocabulary checkpoint, and the goals table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import llamacpp  # noqa: E402
import peers  # noqa: E402

from rwkv_opt.checkpoint.synth import preset_config  # noqa: E402
from rwkv_opt.errors import RwkvOptError  # noqa: E402

# llama-bench -m tiny-f32.gguf -t 2 -p 16,32 -n 4 -r 2 -o json on this project's build (fields trimmed)
BENCH_JSON = """[
 {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "Intel(R) Xeon(R) Processor",
  "model_type": "rwkv7 ?B all F32", "model_size": 68858880, "n_threads": 2, "n_prompt": 16, "n_gen": 0,
  "avg_ts": 3411.837044, "samples_ts": [752.413, 6071.26]},
 {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "Intel(R) Xeon(R) Processor",
  "model_type": "rwkv7 ?B all F32", "model_size": 68858880, "n_threads": 2, "n_prompt": 32, "n_gen": 0,
  "avg_ts": 1330.060447, "samples_ts": [1621.35, 1038.77]},
 {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "Intel(R) Xeon(R) Processor",
  "model_type": "rwkv7 ?B all F32", "model_size": 68858880, "n_threads": 2, "n_prompt": 0, "n_gen": 4,
  "avg_ts": 84.832398, "samples_ts": [68.6544, 101.01]}
]"""


def fake_build(root: Path, src: Path | None = None) -> Path:
    """A CMake build directory layout: bin/llama-bench, bin/llama-quantize, and a CMakeCache.txt naming `src`."""
    (root / "bin").mkdir(parents=True)
    for tool in llamacpp.TOOLS:
        (root / "bin" / tool).write_text("#!/bin/sh\n")
        os.chmod(root / "bin" / tool, 0o755)
    if src is not None:
        (root / "CMakeCache.txt").write_text(f"CMAKE_BUILD_TYPE:STRING=Release\nCMAKE_HOME_DIRECTORY:INTERNAL={src}\n")
    return root


@pytest.fixture
def no_build_env(monkeypatch, tmp_path):
    """No $LLAMA_CPP_DIR / $LLAMA_CPP_SRC and no llama-bench on PATH."""
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.delenv("LLAMA_CPP_SRC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))


def test_parse_bench_rows():
    row = llamacpp.parse_bench(BENCH_JSON)
    assert row["prefill_tok_s_16"] == pytest.approx((752.413 + 6071.26) / 2)  # median of the repetitions
    assert row["prefill_tok_s_32"] == pytest.approx((1621.35 + 1038.77) / 2)
    assert row["decode_ms_p50"] == pytest.approx(1e3 / ((68.6544 + 101.01) / 2))
    assert row["decode_ms_p95"] == pytest.approx(1e3 / 68.6544)  # the slowest repetition
    assert row["decode_tokens"] == 4
    assert row["llama_build"] == "0c1e570 (build 1)"
    assert row["llama_cpu"] == "Intel(R) Xeon(R) Processor"
    assert row["llama_model"] == "rwkv7 ?B all F32, 65.7 MiB"


def test_parse_bench_refuses_output_without_decode_or_json():
    prefill_only = json.dumps([t for t in json.loads(BENCH_JSON) if t["n_gen"] == 0])
    with pytest.raises(RwkvOptError, match="no decode"):
        llamacpp.parse_bench(prefill_only)
    with pytest.raises(RwkvOptError, match="no JSON"):
        llamacpp.parse_bench("| model | size |")


def test_find_build_from_env_reads_the_source_dir(tmp_path, no_build_env, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "convert_hf_to_gguf.py").write_text("")
    root = fake_build(tmp_path / "build", src)
    monkeypatch.setenv("LLAMA_CPP_DIR", str(root))
    build = llamacpp.find_build()
    assert build.bin == (root / "bin").resolve() and build.src == src
    assert build.converter() == src / "convert_hf_to_gguf.py"
    # an explicit directory wins over the environment; the bin/ directory itself is accepted too
    other = fake_build(tmp_path / "other")
    assert llamacpp.find_build(other / "bin").bin == (other / "bin").resolve()


def test_find_build_on_path_and_none(tmp_path, no_build_env, monkeypatch):
    assert llamacpp.find_build() is None
    root = fake_build(tmp_path / "build")
    monkeypatch.setenv("PATH", str(root / "bin"))
    build = llamacpp.find_build()
    assert build.bin == (root / "bin").resolve() and build.src is None
    with pytest.raises(RwkvOptError, match="LLAMA_CPP_SRC"):
        build.converter()


def test_find_build_refuses_a_directory_without_llama_bench(tmp_path, no_build_env, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(RwkvOptError, match=r"\$LLAMA_CPP_DIR\) holds no llama-bench"):
        llamacpp.find_build()


def test_command_lines(tmp_path):
    src = tmp_path / "src"
    build = llamacpp.build_at(fake_build(tmp_path / "b", src), "test")
    b = str(build.bin)
    assert llamacpp.bench_command(build, Path("m.gguf"), 2, [128, 512], 64, 3) == [
        f"{b}/llama-bench", "-m", "m.gguf", "-t", "2", "-p", "128,512", "-n", "64", "-r", "3", "-o", "json"
    ]  # fmt: skip
    assert llamacpp.quantize_command(build, Path("a.gguf"), Path("b.gguf"), "q4_0") == [
        f"{b}/llama-quantize", "a.gguf", "b.gguf", "Q4_0"
    ]  # fmt: skip
    src.mkdir()
    (src / "convert_hf_to_gguf.py").write_text("")
    assert llamacpp.convert_command(build, Path("hf"), Path("o.gguf")) == [
        sys.executable, str(src / "convert_hf_to_gguf.py"), "hf", "--outtype", "f32", "--outfile", "o.gguf"
    ]  # fmt: skip


def test_run_tool_failure_is_one_sentence(tmp_path):
    with pytest.raises(RwkvOptError, match=r"llama-quantize failed \(exit 3: bad type\); command: sh -c"):
        llamacpp.run_tool(["sh", "-c", "echo bad type >&2; exit 3"], "llama-quantize")


def test_world_config_keeps_dims_and_sets_the_world_vocabulary():
    tiny, world = preset_config("tiny"), llamacpp.world_config("tiny")
    assert world.vocab == llamacpp.WORLD_VOCAB != tiny.vocab
    assert (world.n_layer, world.n_embd, world.d_decay) == (tiny.n_layer, tiny.n_embd, tiny.d_decay)
    assert llamacpp.world_config("0.1b") == preset_config("0.1b")


def _row(kind: str, decode: float, prefill: float) -> dict:
    return {"kind": kind, "decode_ms_p50": decode, "decode_ms_p95": decode * 1.1, "prefill_tok_s_512": prefill}


def test_goal_rows_ratios_and_verdicts():
    results = [
        _row("ours", 20.0, 1000.0),
        _row("ours", 24.0, 900.0),
        _row("theirs", 30.0, 500.0),
        _row("theirs", 26.0, 520.0),
        _row("ours-int8", 8.0, 2000.0),
        _row("ours-int4", 9.0, 800.0),
    ]
    summ = peers.summarize(results, [512])
    assert summ["ours", "decode_ms_p50"] == (22.0, 20.0) and summ["theirs", "prefill_tok_s_512"] == (510.0, 520.0)
    rows = {r["ratio"]: r for r in peers.goal_rows(summ, [512], 20.0)}
    fp32 = rows["decode: rwkv-opt cpu-fp32 / official fp32"]
    assert fp32["median"] == pytest.approx(22 / 28) and fp32["best"] == pytest.approx(20 / 26)
    assert fp32["goal"] == "<= 0.8x" and fp32["holds"] is True
    floor = rows["decode: rwkv-opt cpu-fp32 / bandwidth floor (20.00 ms)"]
    assert floor["median"] == pytest.approx(1.1) and floor["holds"] is True
    pre = rows["prefill T=512: rwkv-opt cpu-fp32 / official fp32"]
    assert pre["median"] == pytest.approx(950 / 510) and pre["goal"] == ">= 1.5x" and pre["holds"] is True
    missing = rows["decode: rwkv-opt cpu-int4 / llama.cpp q4_0"]
    assert missing["median"] is None and missing["holds"] is None
    assert {r["ratio"] for r in peers.goal_rows(summ, [512], 20.0) if r["median"] is None} == {
        "decode: rwkv-opt cpu-fp32 / llama.cpp f32",
        "decode: rwkv-opt cpu-int8 / llama.cpp q8_0",
        "decode: rwkv-opt cpu-int4 / llama.cpp q4_0",
        "prefill T=512: rwkv-opt cpu-fp32 / llama.cpp f32",
        "prefill T=512: rwkv-opt cpu-int8 / llama.cpp q8_0",
        "prefill T=512: rwkv-opt cpu-int4 / llama.cpp q4_0",
    }


def test_goal_lines_say_what_misses():
    summ = peers.summarize([_row("ours", 10.0, 800.0), _row("llama-q4_0", 5.0, 1000.0)], [512])
    row = peers._goal(summ, "decode", "ours", "llama-q4_0", "decode_ms_p50", "<=", 0.8)
    assert row["median"] == 2.0 and row["holds"] is False
    assert (
        peers._goal_lines([row])[-1]
        == "| decode: rwkv-opt cpu-fp32 / llama.cpp q4_0 | <= 0.8x | 2.00 | 2.00 | **no** |"
    )


def test_peers_refuses_a_missing_llama_cpp_dir(tmp_path):
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "peers.py"), "--llama-cpp", str(tmp_path / "nope"), "--work",
         str(tmp_path / "w"), "-o", str(tmp_path / "r.md")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"peers.py: error: {tmp_path / 'nope'} (--llama-cpp) holds no")
    assert not (tmp_path / "w").exists() and not (tmp_path / "r.md").exists()


def test_llamacpp_check_without_a_build_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_DIR", "LLAMA_CPP_SRC")}
    env["PATH"] = str(Path(sys.executable).parent)
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "llamacpp.py"), "check", "--work", str(tmp_path / "w")],
        capture_output=True, text=True, cwd=REPO, env=env,
    )  # fmt: skip
    assert p.returncode == 2 and p.stderr.startswith("llamacpp.py: error: no llama.cpp build found")
    assert not (tmp_path / "w").exists()


def test_report_has_a_column_per_runner_and_the_goals(tmp_path):
    rows = [
        {**_row(k, d, p), "peak_rss_mb": 100.0, "load_1m_start": 0.5, "load_1m_end": 0.6}
        for k, d, p in [("ours", 20.0, 1000.0), ("theirs", 27.0, 500.0), ("llama-f32", 25.0, 700.0)]
    ]
    rows[2].update(llama_build="0c1e570 (build 1)", llama_cpu="Xeon", llama_model="rwkv7, 537 MiB", decode_tokens=64)
    rows[0]["load_s"] = 0.2
    a = SimpleNamespace(prompt_lens="512", preset="tiny", threads=2, runs=1, decode=8, command="peers.py --runs 1")
    a.machine, a.date = "Xeon, 2 logical CPUs; flags: avx2", "2026-12-05 20:00 UTC"
    manifest = {"target": "cpu-fp32", "passes": [{"name": "fuse_wkv"}]}
    cfg = llamacpp.world_config("tiny")
    text = peers.write_report(tmp_path / "r.md", a, rows, [{"gbps": 10.0}], cfg, manifest)
    title = text.splitlines()[0]
    assert title.startswith("# Peers: rwkv-opt cpu-fp32 vs official rwkv ") and title.endswith(
        "llama.cpp (f32), tiny synthetic"
    )
    assert "| metric | better is | rwkv-opt cpu-fp32 | official fp32 | llama.cpp f32 |" in text
    assert "| load (session/model) s | lower | 0.2 (0.2) | - | - |" in text
    assert "- llama.cpp: build 0c1e570 (build 1) (llama-bench -o json, 64 generated tokens" in text
    assert "| decode: rwkv-opt cpu-fp32 / llama.cpp f32 | <= 0.85x | 0.80 | 0.80 | yes |" in text
    assert "| prefill T=512: rwkv-opt cpu-fp32 / llama.cpp f32 | >= 1.5x | 1.43 | 1.43 | **no** |" in text
    assert "| decode: rwkv-opt cpu-int8 / llama.cpp q8_0 | <= 0.8x | n/a | n/a |" in text
    assert "- machine: Xeon, 2 logical CPUs; flags: avx2\n- date: 2026-12-05 20:00 UTC\n" in text
    assert "\n![decode and prefill per bit width](r.png)\n" in text and (tmp_path / "r.png").is_file()
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["results"] == rows and saved["machine"] == a.machine and saved["date"] == a.date


def test_logits_check_needs_libllama(tmp_path):
    build = llamacpp.build_at(fake_build(tmp_path / "b"), "test")
    with pytest.raises(
        RwkvOptError, match=r"has no libllama.so, which the check loads; build it there \(ninja llama\)"
    ):
        llamacpp.llama_logits(build, tmp_path / "m.gguf", [1, 2], 2, steps=False)
