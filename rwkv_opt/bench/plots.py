"""The report's two plots, as PNG bytes (matplotlib's Agg backend: no display needed).

latency_vs_accuracy: per target and provider, decode ms/step (left) and prefill tok/s (right)
                     against max|err| / std(ref) on a log scale; each point is one setting.
decode_by_batch:     decode ms/step p50 (bar) to p95 (whisker) and decode tok/s, by batch size
                     (median over prompt lengths).
"""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ERR_FLOOR = 1e-9  # exact agreement (error 0) is drawn here so a log axis can show it


def series_labels(df: pd.DataFrame) -> pd.Series:
    """'target @ provider', or the artifact's name when two artifacts share a target."""
    per_target = df.groupby("target")["artifact"].nunique()
    name = [a if per_target[t] > 1 else t for a, t in zip(df["artifact"], df["target"])]
    return pd.Series([f"{n} @ {p}" for n, p in zip(name, df["provider"])], index=df.index)


def _colors(labels: pd.Series) -> dict[str, str]:
    """One colour per series, in order of first appearance, the same in every plot."""
    return {lab: f"C{i}" for i, lab in enumerate(dict.fromkeys(labels))}


def _number_axis(ax, values: pd.Series) -> None:
    v = values.astype(float).dropna()
    if len(v) and v.min() > 0 and v.max() / v.min() > 20:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda x, _: f"{x:,.4g}"))
    ax.tick_params(axis="x", labelrotation=30)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def latency_vs_accuracy(df: pd.DataFrame) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = series_labels(df)
    colors = _colors(labels)
    err = df["max_rel_err"].astype(float).clip(lower=ERR_FLOOR)
    panels = [("decode_ms_p50", "decode ms / step (p50, lower is better)"),
              ("prefill_tok_s", "prefill tokens / s (higher is better)")]
    for ax, (col, xlabel) in zip(axes, panels):
        for lab, color in colors.items():
            idx = labels.index[labels == lab]
            x, y = df.loc[idx, col].astype(float), err[idx]
            ax.scatter(x, y, s=50, color=color, label=lab, zorder=3)
            for j in idx:
                ax.annotate(f"B{df.at[j, 'batch']} T{df.at[j, 'prompt_len']}", (x[j], y[j]), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        _number_axis(ax, df[col])
        ax.grid(True, which="both", alpha=0.3)
        if err.notna().any():
            ax.set_yscale("log")
            lo, hi = np.nanmin(err), np.nanmax(err)
            ax.set_ylim(lo / 10, hi * 10)
        else:
            ax.text(0.5, 0.5, "accuracy not measured", transform=ax.transAxes, ha="center")
    axes[0].set_ylabel("max|err| / std(ref)  (vs fp32 numpy reference)")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle("Latency vs accuracy per target")
    return _png(fig)


def decode_by_batch(df: pd.DataFrame) -> bytes:
    d = df.assign(series=series_labels(df))
    colors = _colors(d["series"])
    g = d.groupby(["series", "batch"], sort=True)[["decode_ms_p50", "decode_ms_p95", "decode_tok_s"]].median()
    series = list(colors)
    batches = sorted(d["batch"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(series), 1)
    pos = np.arange(len(batches))
    for i, s in enumerate(series):
        rows = g.loc[s].reindex(batches)
        x = pos + (i - (len(series) - 1) / 2) * width
        p50, p95 = rows["decode_ms_p50"].to_numpy(float), rows["decode_ms_p95"].to_numpy(float)
        axes[0].bar(x, p50, width, color=colors[s], label=s)
        axes[0].errorbar(x, p95, yerr=[p95 - p50, np.zeros_like(p95)], fmt="none", ecolor="black", capsize=3)
        axes[1].bar(x, rows["decode_tok_s"].to_numpy(float), width, color=colors[s], label=s)
    for ax, ylabel in zip(axes, ["decode ms / step (bar p50, whisker p95)", "decode tokens / s (all sequences)"]):
        ax.set_xticks(pos, [f"B={b}" for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Decode latency by batch (median over prompt lengths)")
    return _png(fig)
