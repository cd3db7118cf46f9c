"""The report's two plots, as PNG bytes (matplotlib's Agg backend: no display needed).

latency_vs_accuracy: per target and provider (colour), decode ms/step (left) and prefill tok/s
                     (right) against max|err| / std(ref) on a log scale; one point per setting,
                     marker = batch size (in the legend only when there are several), label = prompt length.
decode_by_batch:     decode ms/step p50 (bar) to p95 (whisker, only when each repeat timed at least
                     report.MIN_P95_STEPS steps) and decode tok/s, by batch size (median over prompt lengths).
Log axes are labelled with plain numbers at 1, 2 and 5 per decade (never "6x10^0").
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rwkv_opt.bench.report import p95_shown  # noqa: E402

MARKERS = "os^Dv<>"
ERR_FLOOR = 1e-9  # exact agreement (error 0) is drawn here so a log axis can show it


def series_labels(df: pd.DataFrame) -> pd.Series:
    """'target @ provider', or the artifact's name when two artifacts share a target."""
    per_target = df.groupby("target")["artifact"].nunique()
    name = [a if per_target[t] > 1 else t for a, t in zip(df["artifact"], df["target"])]
    return pd.Series([f"{n} @ {p}" for n, p in zip(name, df["provider"])], index=df.index)


def _colors(labels: pd.Series) -> dict[str, str]:
    """One colour per series, in order of first appearance, the same in every plot."""
    return {lab: f"C{i}" for i, lab in enumerate(dict.fromkeys(labels))}


def _plain(x: float, _pos=None) -> str:
    """A tick label a person reads at once: 1,200 / 12 / 0.05 / 1e-06."""
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if x >= 1e-3 else f"{x:.0e}"


def _log_axis(axis) -> None:
    """Log scale ticks at 1, 2 and 5 per decade, labelled as plain numbers, no minor labels."""
    axis.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(mticker.FuncFormatter(_plain))
    axis.set_minor_formatter(mticker.NullFormatter())


def _number_axis(ax, values: pd.Series) -> None:
    v = values.astype(float).dropna()
    if len(v) and v.min() > 0 and v.max() / v.min() > 20:
        ax.set_xscale("log")
        _log_axis(ax.xaxis)
    else:
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(_plain))
    ax.tick_params(axis="x", labelrotation=30)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def latency_vs_accuracy(df: pd.DataFrame) -> bytes:
    return _png(accuracy_figure(df))


def decode_by_batch(df: pd.DataFrame) -> bytes:
    return _png(batch_figure(df))


def accuracy_figure(df: pd.DataFrame):
    """The latency_vs_accuracy figure (kept open, so tests can read its ticks and legend)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    labels = series_labels(df)
    colors = _colors(labels)
    markers = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(sorted(df["batch"].unique()))}
    err = df["max_rel_err"].astype(float).clip(lower=ERR_FLOOR)
    panels = [
        ("decode_ms_p50", "decode ms / step (p50, lower is better)"),
        ("prefill_tok_s", "prefill tokens / s (higher is better)"),
    ]
    for ax, (col, xlabel) in zip(axes, panels):
        for j in df.index:
            x, y = float(df.at[j, col]), err[j]
            ax.scatter(x, y, s=55, color=colors[labels[j]], marker=markers[df.at[j, "batch"]], zorder=3)
            ax.annotate(f"T{df.at[j, 'prompt_len']}", (x, y), fontsize=7, xytext=(5, 4), textcoords="offset points")
        ax.set_xlabel(xlabel)
        _number_axis(ax, df[col])
        ax.grid(True, which="both", alpha=0.3)
        if err.notna().any():
            ax.set_yscale("log")
            ax.set_ylim(np.nanmin(err) / 10, np.nanmax(err) * 10)
            ax.yaxis.set_major_formatter(mticker.FuncFormatter(_plain))
            ax.yaxis.set_minor_formatter(mticker.NullFormatter())
        else:
            ax.text(0.5, 0.5, "accuracy not measured", transform=ax.transAxes, ha="center")
    axes[0].set_ylabel("max|err| / std(ref)  (vs fp32 numpy reference)")
    if len(markers) == 1:  # one batch size: the legend shows the marker that is drawn
        ((b, m),) = markers.items()
        handles = [Line2D([], [], color=c, marker=m, ls="", label=f"{lab} (batch {b})") for lab, c in colors.items()]
    else:  # colour = series, marker = batch size, each explained once
        handles = [Patch(color=c, label=lab) for lab, c in colors.items()]
        handles += [Line2D([], [], color="gray", marker=m, ls="", label=f"batch {b}") for b, m in markers.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.suptitle("Latency vs accuracy per target (label: prompt length T)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def batch_figure(df: pd.DataFrame):
    """The decode_by_batch figure (kept open, so tests can read its ticks and whiskers)."""
    d = df.assign(series=series_labels(df))
    colors = _colors(d["series"])
    g = d.groupby(["series", "batch"], sort=True)[["decode_ms_p50", "decode_ms_p95", "decode_tok_s"]].median()
    series = list(colors)
    batches = sorted(d["batch"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(series), 1)
    pos = np.arange(len(batches))
    whiskers = p95_shown(df)
    for i, s in enumerate(series):
        rows = g.loc[s].reindex(batches)
        x = pos + (i - (len(series) - 1) / 2) * width
        p50, p95 = rows["decode_ms_p50"].to_numpy(float), rows["decode_ms_p95"].to_numpy(float)
        axes[0].bar(x, p50, width, color=colors[s], label=s)
        if whiskers:
            axes[0].errorbar(x, p95, yerr=[p95 - p50, np.zeros_like(p95)], fmt="none", ecolor="black", capsize=3)
        axes[1].bar(x, rows["decode_tok_s"].to_numpy(float), width, color=colors[s], label=s)
    ms = g[["decode_ms_p50", "decode_ms_p95"] if whiskers else ["decode_ms_p50"]].to_numpy(float)
    if np.nanmax(ms) / max(np.nanmin(ms), 1e-9) > 20:  # a noisy p95 would flatten the p50 bars
        axes[0].set_yscale("log")
        _log_axis(axes[0].yaxis)
    ms_label = "decode ms / step (bar p50, whisker to p95)" if whiskers else "decode ms / step (p50)"
    for ax, ylabel in zip(axes, [ms_label, "decode tokens / s (all sequences)"]):
        ax.set_xticks(pos, [f"B={b}" for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    fig.legend(
        handles=axes[1].patches[:: len(batches)],
        labels=series,
        loc="lower center",
        ncol=min(len(series), 5),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle("Decode latency by batch (median over prompt lengths)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
