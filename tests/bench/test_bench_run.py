"""bench.run on tiny artifacts with small settings: the schema, the figures, the report files."""
import subprocess
import sys

import pandas as pd
import pytest

import rwkv_opt.bench as bench
from rwkv_opt.bench.report import COLUMNS, SCHEMA, frame, write_report
from rwkv_opt.cli import main as cli_main


@pytest.fixture(scope="module")
def df(tiny_dir):
    return bench.run([tiny_dir / "cpu-fp32", tiny_dir / "base"], batches=(1, 2), prompt_lens=(8,), decode=4,
                     repeat=2, drift_tokens=16, profile=True, progress=lambda _m: None)


def test_schema(df):
    assert tuple(df.columns) == COLUMNS
    assert {c: str(t) for c, t in df.dtypes.items()} == {c: str(pd.Series(dtype=t).dtype) for c, t in SCHEMA}
    assert len(df) == 4  # 2 artifacts x 1 provider x 2 batches x 1 prompt length
    assert list(df["target"].unique()) == ["cpu-fp32", "base-fp32"]
    assert set(df["provider"]) == {"cpu"} and set(df["precision"]) == {"fp32"}


def test_figures(df):
    assert (df["prefill_tok_s"] > 0).all() and (df["decode_ms_p95"] >= df["decode_ms_p50"]).all()
    assert (df["peak_rss_mb"] > df["rss_before_mb"]).all() and (df["size_mb"] > 0).all()
    assert (df["nodes_on_provider"] == 1).all() and (df["time_on_provider"] == 1).all() and not df["cpu_fallback"].any()
    assert (df["top1"] == 1).all() and (df["max_rel_err"] < 1e-4).all() and (df["state_drift"] < 1e-4).all()
    assert list(df["acc_positions"]) == [17, 34, 24, 48]  # last-logits vs all-logits prompt, + 16 steps, x batch
    assert (df["load_1m_max"] >= df["load_1m_min"]).all() and df["gpu_mem_mb"].isna().all()


def test_profile_breakdown(df):
    prof = df.attrs["profile"]
    blocks = prof[(prof.kind == "block") & (prof.phase == "decode")]
    assert {"blocks.000", "blocks.001"} <= set(blocks["group"])
    assert {"MatMul"} <= set(prof[prof.kind == "op"]["group"])


def test_frame_rejects_rows_off_schema():
    with pytest.raises(ValueError, match="missing"):
        frame([{"artifact": "x"}])


def test_report_files_and_self_contained_html(df, tmp_path):
    paths = write_report(df, tmp_path / "rep", {"command": "rwkv-opt bench ..."})
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 2
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert paths["md"].read_text().startswith("# rwkv-opt bench")
    assert tuple(pd.read_csv(paths["csv"]).columns) == COLUMNS
    assert paths["plot_accuracy"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "profile" in paths


def test_cli_bench(tiny_dir, tmp_path):
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "rwkv_opt.cli", "bench", str(tiny_dir / "cpu-fp32"), "--batch", "1",
                        "--prompt-lens", "4", "--decode", "3", "--repeat", "1", "--drift-tokens", "4", "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[1/2]" in r.stderr and "[2/2]" in r.stderr  # progress per job
    assert "| cpu-fp32 |" in r.stdout
    assert {p.name for p in out.iterdir()} == {"bench.csv", "bench.md", "bench.html", "latency_vs_accuracy.png",
                                                "decode_by_batch.png"}


def test_unavailable_provider_refused_up_front(tiny_dir, tmp_path, capsys):
    rc = cli_main(["bench", str(tiny_dir / "cpu-fp32"), "--providers", "cuda", "-o", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "'cuda' is not available" in err and "--providers cpu" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, msg", [
    (["--providers", "tpu"], "unknown provider 'tpu'"),
    (["--decode", "0"], "must be >= 1"),
])
def test_bad_settings_refused(tiny_dir, tmp_path, capsys, args, msg):
    assert cli_main(["bench", str(tiny_dir / "cpu-fp32"), *args, "-o", str(tmp_path / "r")]) == 2
    assert msg in capsys.readouterr().err


def test_not_an_artifact(tmp_path, capsys):
    assert cli_main(["bench", str(tmp_path), "-o", str(tmp_path / "r")]) == 2
    assert "holds no model.onnx" in capsys.readouterr().err
