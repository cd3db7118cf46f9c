"""llama.cpp as a peer, end to end on the tiny shape with the World vocabulary: our fla-hub folder through
convert_hf_to_gguf.py and llama-quantize, llama.cpp's logits against our reference, and one llama-bench row.

Skipped where no llama.cpp build is found ($LLAMA_CPP_DIR, or llama-bench on PATH; see benchmarks/llamacpp.py)
or llama-cpp-python's Python part is not installed: CI has neither.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import llamacpp  # noqa: E402
import peers  # noqa: E402

from rwkv_opt.errors import RwkvOptError  # noqa: E402


def _build_or_reason() -> tuple[llamacpp.LlamaCpp | None, str]:
    try:
        build = llamacpp.find_build()
    except RwkvOptError as e:
        return None, str(e)
    if build is None:
        return None, "no llama.cpp build: set LLAMA_CPP_DIR to one (benchmarks/llamacpp.py) or put llama-bench on PATH"
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "llama-cpp-python's Python part is not installed (benchmarks/llamacpp.py says how)"
    return build, ""


BUILD, REASON = _build_or_reason()
pytestmark = pytest.mark.skipif(BUILD is None, reason=REASON)


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> tuple[Path, dict]:
    """`llamacpp.py check` on 32 tokens: the work dir (checkpoint, GGUFs) and its JSON figures."""
    work = tmp_path_factory.mktemp("llamacpp")
    cmd = [sys.executable, str(REPO / "benchmarks" / "llamacpp.py"), "check", "--llama-cpp", str(BUILD.bin)]
    p = subprocess.run(
        [*cmd, "--tokens", "32", "--work", str(work), "--json", str(work / "check.json")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return work, json.loads((work / "check.json").read_text())


def test_llama_cpp_f32_matches_our_reference(checked):
    _, res = checked
    assert res["config"]["vocab"] == llamacpp.WORLD_VOCAB and res["tokens"] == 32
    rows = res["rows"]
    for name in llamacpp.CHECKED:  # llama.cpp's prefill and decode paths, and our cpu-fp32 artifact
        assert rows[name]["max_rel_err"] <= 1e-4 and rows[name]["top1"] == 1.0, (name, rows[name])
    assert rows["llama.cpp f32 vs rwkv-opt cpu-fp32"]["max_rel_err"] <= 1e-4
    # quantized GGUFs: near the reference, as far as our int4 budget allows (max|err|/std <= 3)
    assert 0 < rows["llama.cpp q8_0, one batch"]["max_rel_err"] < rows["llama.cpp q4_0, one batch"]["max_rel_err"] < 3


def test_llama_bench_row(checked):
    work, res = checked
    gguf = work / f"{Path(res['checkpoint']).stem}-q4_0.gguf"
    row = peers.measure_llama(str(gguf), [16], 4, 2, str(BUILD.bin))
    assert row["prefill_tok_s_16"] > 0 and 0 < row["decode_ms_p50"] <= row["decode_ms_p95"]
    assert row["decode_tokens"] == 4 and "Q4_0" in row["llama_model"] and row["llama_build"]
    assert row["peak_rss_mb"] > 0 and row["kind"] == "llama"
