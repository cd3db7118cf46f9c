"""bench.run on tiny artifacts with small settings: the schema, the figures, the report files."""

import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import rwkv_opt.bench as bench
from rwkv_opt.bench.report import (
    COLUMNS,
    MIN_P95_STEPS,
    SCHEMA,
    budget_check,
    frame,
    precision_label,
    summary_frame,
    write_report,
)
from rwkv_opt.cli import main as cli_main


@pytest.fixture(scope="module")
def df(tiny_dir):
    return bench.run(
        [tiny_dir / "cpu-fp32", tiny_dir / "base"],
        batches=(1, 2),
        prompt_lens=(8,),
        decode=4,
        repeat=2,
        drift_tokens=16,
        profile=True,
        progress=lambda _m: None,
    )


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
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkv_opt.cli",
            "bench",
            str(tiny_dir / "cpu-fp32"),
            "--batch",
            "1",
            "--prompt-lens",
            "4",
            "--decode",
            "3",
            "--repeat",
            "1",
            "--drift-tokens",
            "4",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "[1/2]" in r.stderr and "[2/2]" in r.stderr  # progress per job
    assert "| cpu-fp32 |" in r.stdout
    assert {p.name for p in out.iterdir()} == {
        "bench.csv",
        "bench.md",
        "bench.html",
        "latency_vs_accuracy.png",
        "decode_by_batch.png",
    }


def test_unavailable_provider_refused_up_front(tiny_dir, tmp_path, capsys):
    rc = cli_main(["bench", str(tiny_dir / "cpu-fp32"), "--providers", "cuda", "-o", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "'cuda' is not available" in err and "--providers cpu" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args, msg", [(["--providers", "tpu"], "unknown provider 'tpu'"), (["--decode", "0"], "must be >= 1")]
)
def test_bad_settings_refused(tiny_dir, tmp_path, capsys, args, msg):
    assert cli_main(["bench", str(tiny_dir / "cpu-fp32"), *args, "-o", str(tmp_path / "r")]) == 2
    assert msg in capsys.readouterr().err


def test_not_an_artifact(tmp_path, capsys):
    assert cli_main(["bench", str(tmp_path), "-o", str(tmp_path / "r")]) == 2
    assert "holds no model.onnx" in capsys.readouterr().err


# ---- the report a person reads (issue 18) ----------------------------------------------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
# Written into the page by the test only (the report itself has no script): where the summary table and each of
# its cells are drawn in a 1400x900 window, and whether each cell is the element seen at its own centre.
PROBE = """<script>addEventListener('load', () => {
  const t = document.getElementById('summary'), r = t.getBoundingClientRect();
  const cells = [...t.querySelectorAll('th,td')].map(e => { const b = e.getBoundingClientRect();
    const hit = document.elementFromPoint(b.left + b.width / 2, b.top + b.height / 2);
    return {text: e.textContent, bottom: b.bottom, right: b.right, seen: !!hit && (hit === e || e.contains(hit))}; });
  const p = document.createElement('pre'); p.id = 'probe';
  p.textContent = JSON.stringify({w: innerWidth, h: innerHeight, bottom: r.bottom, right: r.right, cells});
  document.body.appendChild(p); });</script>"""


def test_summary_one_row_per_artifact_with_budget(df):
    s = summary_frame(df)
    assert list(s["artifact"]) == ["cpu-fp32", "base"] and list(s["within budget"]) == ["✓", "–"]
    assert s["decode ms/token"].iloc[0] == df[(df.artifact == "cpu-fp32") & (df.batch == 1)]["decode_ms_p50"].median()
    broken = df.assign(max_rel_err=0.5)  # far over cpu-fp32's 1e-4
    assert summary_frame(broken)["within budget"].iloc[0] == "✗"
    mark, why = budget_check(broken.iloc[0])
    assert mark == "✗" and why.startswith("missed: max|err|/std 5.00e-01 > 0.0001")
    assert precision_label("fp32", "int8-dynamic") == "int8 + fp32"
    assert precision_label("fp16-mixed", "nbits4-b32-gptq") == "int4 + fp16-mixed"
    assert precision_label("fp32", "none") == "fp32"


def _tick_labels(fig) -> list[str]:
    fig.canvas.draw()
    return [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]


def test_plots_plain_labels_legend_as_drawn_and_p95_only_with_enough_steps(df):
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from rwkv_opt.bench.plots import accuracy_figure, batch_figure

    fig = accuracy_figure(df)
    labels = _tick_labels(fig)
    assert labels and not [x for x in labels if "times" in x or "^" in x or "\\" in x], labels
    drawn = {m for ax in fig.axes for c in ax.collections for m in [c.get_paths()[0].vertices.shape[0]]}
    legend = fig.legends[0]
    assert {t.get_text() for t in legend.get_texts()} >= {"batch 1", "batch 2"}  # two batch sizes drawn
    assert len(drawn) == 2  # circle and square paths: the two markers the legend explains
    plt.close(fig)
    one = df[df.batch == 1]
    fig = accuracy_figure(one)
    assert not [t for t in fig.legends[0].get_texts() if t.get_text().startswith("batch ")]
    assert all("(batch 1)" in t.get_text() for t in fig.legends[0].get_texts())
    plt.close(fig)
    for steps, whiskers in ((4, 0), (MIN_P95_STEPS, 1)):
        fig = batch_figure(df.assign(decode_steps=steps))
        n = sum(isinstance(c, ErrorbarContainer) for ax in fig.axes for c in ax.containers)
        assert (n > 0) == bool(whiskers), (steps, n)
        assert not [x for x in _tick_labels(fig) if "times" in x or "^" in x]
        plt.close(fig)


def test_html_summary_on_top_full_table_behind_a_toggle(df, tmp_path):
    html = write_report(df, tmp_path / "rep")["html"].read_text()
    assert html.index("id='summary'") < html.index("<img") < html.index("<details>")
    assert "rwkv_opt/bench/report.py" not in html and "decode p95 is not shown" in html
    full = html[html.index("<details>") :]
    assert f"All {len(df)} rows &times; {len(COLUMNS)} columns" in full and "decode_ms_p95" in full
    single = write_report(df.iloc[:1], tmp_path / "one")["html"].read_text()  # nothing to compare: no plots
    assert "<img" not in single and "one setting was measured" in single and "id='summary'" in single


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed and the README's test command "
    "could not install it (apt-get install chromium)",
)
def test_summary_visible_in_the_first_1400x900_viewport(df, tmp_path):
    """The page as a browser draws it: every summary cell inside the first window, not covered, and the
    screenshot is that window."""
    import json
    import struct

    page = write_report(df, tmp_path / "rep")["html"]
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,900",
    ]
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    assert struct.unpack(">II", shot.read_bytes()[16:24]) == (1400, 900)
    dom = subprocess.run(
        flags + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    seen = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).replace("&amp;", "&"))
    height = min(seen["h"], 900)
    assert 0 < seen["bottom"] <= height and seen["right"] <= seen["w"], seen
    texts = [c["text"] for c in seen["cells"]]
    for key in ("decode ms/token", "prefill tok/s", "top-1", "KL", "size MB", "within budget", "cpu-fp32", "✓"):
        assert any(key in t for t in texts), key
    assert all(c["seen"] and c["bottom"] <= height for c in seen["cells"]), seen["cells"]
