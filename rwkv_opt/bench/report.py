"""The benchmark table's fixed schema, and its CSV / Markdown / self-contained HTML reports.

One row per artifact x provider x batch x prompt length. Columns, in this order (SCHEMA is the
source of truth; `frame()` refuses rows with missing or extra keys):

identity   artifact, path, target, target_provider (the EP the target was built for), provider (the
           EP measured on), precision, quantization, logits, n_layer, n_embd, vocab, size_mb (model.onnx
           + .data on disk, MiB)
setting    batch, prompt_len, decode_steps, repeat, threads (0 = ORT default)
latency    session_s (creation, fresh process), prefill_ms, prefill_tok_s (B*T / prefill time),
           decode_ms_p50, decode_ms_p95 (ms per decode step = per token of each sequence),
           decode_tok_s (B / p50); medians over `repeat` rounds, each a fresh process, warm-up
           excluded (see latency.py and runner.run)
memory     rss_before_mb (after imports, before the session), peak_rss_mb (VmHWM of the
           measuring process), gpu_mem_mb (nvidia-smi, NaN without a GPU)
load       load_1m_min, load_1m_max: the 1-minute load average sampled before and after each timed run
placement  nodes_on_provider, time_on_provider (fractions, ORT profiler), cpu_fallback
accuracy   max_rel_err (max|err| / std(ref)), mean_kl (KL(ref || model), nats), top1, state_drift
           (max|err| / std of the WKV states after the decode), acc_positions (logit rows compared),
           drift_tokens (teacher-forced decode steps after the prompt); NaN when accuracy is off
provenance note (e.g. a CUDA target measured on CPU; a 4-bit artifact's GEMMs on int8 twins), measured_at
           (UTC, ISO 8601)

The HTML page reads top-down: a summary (one row per artifact and provider, with "within budget"
against its target's accuracy budget), the plots, then the full table behind a toggle. Its
precision column names the weights' quantization (int8 + fp32); decode p95 is shown only when each
repeat timed at least MIN_P95_STEPS steps (of fewer, p95 is about their slowest outlier).
"""

from __future__ import annotations

import base64
import html
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

SCHEMA: tuple[tuple[str, str], ...] = (
    ("artifact", "string"),
    ("path", "string"),
    ("target", "string"),
    ("target_provider", "string"),
    ("provider", "string"),
    ("precision", "string"),
    ("quantization", "string"),
    ("logits", "string"),
    ("n_layer", "Int64"),
    ("n_embd", "Int64"),
    ("vocab", "Int64"),
    ("size_mb", "float64"),
    ("batch", "Int64"),
    ("prompt_len", "Int64"),
    ("decode_steps", "Int64"),
    ("repeat", "Int64"),
    ("threads", "Int64"),
    ("session_s", "float64"),
    ("prefill_ms", "float64"),
    ("prefill_tok_s", "float64"),
    ("decode_ms_p50", "float64"),
    ("decode_ms_p95", "float64"),
    ("decode_tok_s", "float64"),
    ("rss_before_mb", "float64"),
    ("peak_rss_mb", "float64"),
    ("gpu_mem_mb", "float64"),
    ("load_1m_min", "float64"),
    ("load_1m_max", "float64"),
    ("nodes_on_provider", "float64"),
    ("time_on_provider", "float64"),
    ("cpu_fallback", "boolean"),
    ("max_rel_err", "float64"),
    ("mean_kl", "float64"),
    ("top1", "float64"),
    ("state_drift", "float64"),
    ("acc_positions", "Int64"),
    ("drift_tokens", "Int64"),
    ("note", "string"),
    ("measured_at", "string"),
)
COLUMNS = tuple(name for name, _ in SCHEMA)
PROFILE_COLUMNS = ("artifact", "target", "provider", "batch", "prompt_len", "phase", "kind", "group", "ms", "share")

MIN_P95_STEPS = 40  # a p95 of fewer timed decode steps per repeat is one outlier: not shown
# The Markdown summary: the columns a reader compares first (the CSV and HTML carry all of them).
SUMMARY = (
    "artifact",
    "target",
    "provider",
    "precision",
    "batch",
    "prompt_len",
    "size_mb",
    "prefill_tok_s",
    "decode_ms_p50",
    "decode_ms_p95",
    "peak_rss_mb",
    "time_on_provider",
    "max_rel_err",
    "mean_kl",
    "top1",
    "state_drift",
    "load_1m_max",
    "note",
)


def frame(rows: list[dict]) -> pd.DataFrame:
    """Rows -> the DataFrame in SCHEMA's order and dtypes."""
    for i, r in enumerate(rows):
        missing, extra = set(COLUMNS) - set(r), set(r) - set(COLUMNS)
        if missing or extra:
            raise ValueError(
                f"bench row {i} does not match the schema (missing {sorted(missing)}, extra {sorted(extra)})"
            )
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df.astype(dict(SCHEMA))


def machine_info() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_1m": round(os.getloadavg()[0], 2),
    }


def _fmt(v) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.2e}"
    return str(v)


def markdown_table(df: pd.DataFrame, columns=None) -> str:
    cols = list(columns or df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df[cols].iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


def p95_shown(df: pd.DataFrame) -> bool:
    """Whether every row timed enough decode steps per repeat for its p95 to mean something."""
    return bool(len(df)) and int(df["decode_steps"].min()) >= MIN_P95_STEPS


def precision_label(precision, quantization) -> str:
    """The precision a reader compares: the weights' quantization first when there is one ('int4 + fp32')."""
    q = "" if quantization is None or quantization is pd.NA else str(quantization)
    if q in ("", "none"):
        return str(precision)
    bits = "int4" if "nbits4" in q else "int8" if ("int8" in q or "nbits8" in q) else q
    return f"{bits} + {precision}"


def budget_check(row) -> tuple[str, str]:
    """('✓' | '✗' | '–', why) for one row's accuracy against its target's budget (rwkv_opt.targets)."""
    from rwkv_opt.targets import TARGETS

    t = TARGETS.get(str(row["target"]))
    if t is None:
        return "–", f"{row['target']} has no accuracy budget"
    if pd.isna(row["top1"]):
        return "–", "accuracy not measured"
    b = t.budget
    misses = b.failures(float(row["top1"]), int(row["acc_positions"]), float(row["max_rel_err"]), float(row["mean_kl"]))
    if misses:
        return "✗", "missed: " + "; ".join(misses)
    return (
        "✓",
        f"{t.name} budget: top-1 >= {b.min_top1:.0%} (binomial test), max|err|/std <= {b.max_rel_err}, "
        f"KL <= {b.max_kl}",
    )


SUMMARY_HEADS = (
    "artifact",
    "target",
    "EP",
    "precision",
    "decode ms/token",
    "prefill tok/s",
    "top-1",
    "KL",
    "size MB",
    "within budget",
)


def summary_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per artifact and provider: latency at its smallest batch (median over prompt lengths),
    accuracy at its worst setting, and whether every setting is within the target's budget."""
    rows = []
    for (art, prov), g in df.groupby(["artifact", "provider"], sort=False):
        small = g[g["batch"] == g["batch"].min()]
        checks = [budget_check(r) for _, r in g.iterrows()]
        marks = {m for m, _ in checks}
        mark = "✗" if "✗" in marks else "–" if "–" in marks else "✓"
        first = g.iloc[0]
        rows.append(
            {
                "artifact": art,
                "target": first["target"],
                "EP": prov,
                "precision": precision_label(first["precision"], first["quantization"]),
                "decode ms/token": small["decode_ms_p50"].median(),
                "prefill tok/s": small["prefill_tok_s"].median(),
                "top-1": g["top1"].min(),
                "KL": g["mean_kl"].max(),
                "size MB": first["size_mb"],
                "within budget": mark,
                "why": next(w for m, w in checks if m == mark),
            }
        )
    return pd.DataFrame(rows, columns=list(SUMMARY_HEADS) + ["why"])


def _summary_cells(r) -> list[str]:
    """A summary row's values as text: ms to 3 digits, rates with separators, top-1 in percent."""
    pct = "" if pd.isna(r["top-1"]) else f"{r['top-1']:.1%}"
    tok_s = "" if pd.isna(r["prefill tok/s"]) else f"{r['prefill tok/s']:,.0f}"
    return [
        str(r["artifact"]),
        str(r["target"]),
        str(r["EP"]),
        str(r["precision"]),
        _fmt(float(r["decode ms/token"])),
        tok_s,
        pct,
        _fmt(float(r["KL"])),
        _fmt(float(r["size MB"])),
        str(r["within budget"]),
    ]


def summary_markdown(df: pd.DataFrame) -> str:
    s = summary_frame(df)
    lines = ["| " + " | ".join(SUMMARY_HEADS) + " |", "|" + "---|" * len(SUMMARY_HEADS)]
    lines += ["| " + " | ".join(_summary_cells(r)) + " |" for _, r in s.iterrows()]
    return "\n".join(lines)


def _settings_line(df: pd.DataFrame) -> str:
    """What the summary's figures are: which batch, prompt lengths, decode steps and positions."""
    lens = ", ".join(str(t) for t in sorted(df["prompt_len"].unique()))
    pos = df["acc_positions"].dropna()
    acc = (
        f"top-1 and KL vs the fp32 numpy reference over {int(pos.min())}-{int(pos.max())} teacher-forced positions "
        "(worst setting)"
        if len(pos)
        else "accuracy not measured"
    )
    return (
        f"decode ms/token: p50 at batch {int(df['batch'].min())}, median over prompt lengths {lens}; prefill "
        f"tok/s likewise; {acc}; within budget: the target's accuracy budget (hover a mark for details)."
    )


def profile_frame(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(records, columns=list(PROFILE_COLUMNS))


def _write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, path)


def _load_line(df: pd.DataFrame, cores: int, threads: int | None = None) -> str:
    """The load note. The workers' own intra-op threads (one worker at a time) are part of the 1-min
    load; only load beyond them means other work shared the CPU."""
    lo, hi = df["load_1m_min"].min(), df["load_1m_max"].max()
    own = threads or cores
    busy = hi >= own + 0.5 * cores
    return (
        f"- load average (1 min) around the timed runs: {lo:.2f} to {hi:.2f} on {cores} cores, including "
        f"the workers' own {own} threads"
        + (
            " -- HIGH: other work shared the CPU, so absolute times are pessimistic; rows were measured in "
            "interleaved rounds, so they compare fairly with each other"
            if busy
            else " (quiet)"
        )
    )


def _header(meta: dict, df: pd.DataFrame | None = None) -> list[str]:
    m = meta.get("machine") or machine_info()
    lines = [f"- machine: {m['cpu']}, {m['cores']} cores ({m['platform']})", f"- date: {m['date']}"]
    if df is not None and len(df):
        lines.append(_load_line(df, m["cores"] or 1, meta.get("threads")))
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    if meta.get("versions"):
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    return lines


def _profile_md(prof: pd.DataFrame, top: int = 8) -> list[str]:
    out = ["", "## Profile (ms per op type and per block; decode = per step)", ""]
    for (art, prov, b, t, phase, kind), g in prof.groupby(
        ["artifact", "provider", "batch", "prompt_len", "phase", "kind"], sort=False
    ):
        out += [
            f"**{art} on {prov}, B={b} T={t}, {phase}, by {kind}**",
            "",
            markdown_table(g.nlargest(top, "ms"), ["group", "ms", "share"]),
            "",
        ]
    return out


def write_report(df: pd.DataFrame, out_dir: str | Path, meta: dict | None = None) -> dict[str, Path]:
    """Write bench.csv, bench.md, bench.html and the plots' PNGs into out_dir; return their paths."""
    from rwkv_opt.bench.plots import decode_by_batch, latency_vs_accuracy

    meta = dict(meta or {})
    meta.setdefault("machine", machine_info())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        k: out / f
        for k, f in [
            ("csv", "bench.csv"),
            ("md", "bench.md"),
            ("html", "bench.html"),
            ("plot_accuracy", "latency_vs_accuracy.png"),
            ("plot_batch", "decode_by_batch.png"),
        ]
    }
    pngs = {"plot_accuracy": latency_vs_accuracy(df), "plot_batch": decode_by_batch(df)}
    for k, png in pngs.items():
        _write(paths[k], png)
    _write(paths["csv"], df.to_csv(index=False))
    prof = df.attrs.get("profile")
    md = (
        ["# rwkv-opt bench", "", summary_markdown(df), "", _settings_line(df), ""]
        + _header(meta, df)
        + [
            "",
            markdown_table(df, SUMMARY),
            "",
            "All columns: bench.csv.",
            "",
            "![latency vs accuracy](latency_vs_accuracy.png)",
            "",
            "![decode latency by batch](decode_by_batch.png)",
            "",
        ]
    )
    if prof is not None and len(prof):
        paths["profile"] = out / "profile.csv"
        _write(paths["profile"], prof.to_csv(index=False))
        md += _profile_md(prof)
    _write(paths["md"], "\n".join(md) + "\n")
    _write(paths["html"], _html(df, meta, pngs, prof))
    return paths


def _summary_html(df: pd.DataFrame) -> str:
    s = summary_frame(df)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in SUMMARY_HEADS)
    body = []
    for _, r in s.iterrows():
        cells = _summary_cells(r)
        ok = {"✓": "ok", "✗": "bad"}.get(r["within budget"], "na")
        body.append(
            "<tr>"
            + "".join(f"<td>{html.escape(c)}</td>" for c in cells[:-1])
            + f"<td class='{ok}' title='{html.escape(r['why'], quote=True)}'>{cells[-1]}"
            + (f" <small>{html.escape(r['why'])}</small>" if ok == "bad" else "")
            + "</td></tr>"
        )
    return f"<table id='summary'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _full_table_html(df: pd.DataFrame) -> str:
    """Every column, precision with its quantization, p95 blank when too few steps were timed."""
    shown = df.assign(precision=[precision_label(p, q) for p, q in zip(df["precision"], df["quantization"])])
    if not p95_shown(df):
        shown["decode_ms_p95"] = float("nan")
    return shown.to_html(index=False, na_rep="", float_format=lambda v: _fmt(float(v)), border=0)


def _html(df: pd.DataFrame, meta: dict, pngs: dict[str, bytes], prof) -> str:
    m = meta.get("machine") or machine_info()
    notes = []
    if len(df) and not p95_shown(df):
        notes.append(
            f"decode p95 is not shown: each repeat timed {int(df['decode_steps'].min())} decode steps, and "
            f"a p95 of fewer than {MIN_P95_STEPS} is about their single slowest step (bench --decode "
            f"{MIN_P95_STEPS} or more shows it)."
        )
    if len(df) < 2:
        notes.append(
            "one setting was measured: the plots compare settings, so they are left out (bench more "
            "artifacts, --batch 1,4 or --prompt-lens 128,512 to fill them)."
        )
    imgs = (
        ""
        if len(df) < 2
        else "".join(
            f'<figure><img alt="{k}" src="data:image/png;base64,{base64.b64encode(v).decode()}"></figure>'
            for k, v in pngs.items()
        )
    )
    head = "".join(f"<li>{html.escape(line[2:])}</li>" for line in _header(meta, df))
    extra = ""
    if prof is not None and len(prof):
        extra = (
            "<details><summary>Profile: ms per op type and per block</summary>"
            + prof.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
            + "</details>"
        )
    style = (
        "body{font-family:sans-serif;margin:1em 1.5em}h1{font-size:1.4em;margin:0 0 .2em}"
        "p.meta{color:#555;margin:0 0 .8em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right;white-space:nowrap}"
        "#summary{font-size:14px}#summary td:nth-child(-n+4){text-align:left}"
        "#summary small{color:#666;white-space:normal}td.ok{color:#070}td.bad{color:#b00;font-weight:bold}"
        "img{max-width:100%}div.scroll{overflow-x:auto}p.note{color:#555;font-size:13px}"
        "details{margin:.6em 0}summary{cursor:pointer;font-weight:bold}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>rwkv-opt bench</title><style>{style}"
        f"</style></head><body><h1>rwkv-opt bench</h1><p class='meta'>{html.escape(m['date'])} &middot; "
        f"{html.escape(str(m['cpu']))}, {m['cores']} cores</p>{_summary_html(df)}"
        f"<p class='note'>{html.escape(_settings_line(df))}</p>"
        + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
        + f"{imgs}<details><summary>All {len(df)} rows &times; {len(df.columns)} columns (also bench.csv)"
        f"</summary><div class='scroll'>{_full_table_html(df)}</div></details>"
        f"<details><summary>Machine, load, command, versions</summary><ul>{head}</ul></details>"
        f"{extra}</body></html>\n"
    )
