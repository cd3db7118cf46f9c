"""Peak memory, wall time per phase and artifact size of `rwkv-opt pipeline` across model sizes.

    python benchmarks/scale.py [--sizes 0.1b 0.4b 1.5b 2.9b 7.2b] [--targets cpu-fp32 cuda-fp16 ...]
                               [--ckpt-dir ckpt] [--out reports] [--no-verify] [--json FILE]

For each synthetic preset a bf16 .pth is written once into --ckpt-dir (`rwkv-opt synth`), then
each target's pipeline runs as a new user runs it: a fresh `rwkv-opt pipeline` process under
/usr/bin/time -v (peak RSS as the kernel counts it: anonymous and file-backed pages), with
verification unless --no-verify. Per run: peak RSS, peak / fp32 weight bytes, wall time, the
manifest's per-phase seconds (build, passes, write, verify) and artifact size, and whether the
artifact verified (or why verification was skipped). The goals (reports/scale.md, "Goals") are checked
in the table: peak <= 1.25x fp32 weights at 1.5B and 2.9B, 7.2B within 22 GiB, 2.9B cpu-fp32 /
cuda-fp16 <= 10 min, cpu-int4 <= 30 min.

Writes --out/scale.md, scale.csv and scale.png (peak RSS and wall time against parameters; both
should be straight lines). Runs are sequential: each uses both cores and most of the memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

PRESET_PARAMS = None


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ensure_checkpoint(size: str, ckpt_dir: Path) -> Path:
    path = ckpt_dir / f"rwkv7-{size}-synth.pth"
    if not path.exists():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        print(f"synth {size} -> {path}", flush=True)
        subprocess.run([sys.executable, "-m", "rwkv_opt", "synth", "--preset", size, "-o", str(path)], check=True)
    return path


def run_one(size: str, target: str, ckpt: Path, work: Path, verify: bool) -> dict:
    out = work / f"{size}-{target}"
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "rwkv_opt",
        "pipeline",
        "--target",
        target,
        "--checkpoint",
        str(ckpt),
        "-o",
        str(out),
    ] + ([] if verify else ["--no-verify"])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    row = {
        "size": size,
        "target": target,
        "mode": "verify" if verify else "--no-verify",
        "rc": p.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gib": int(rss.group(1)) / 2**20 if rss else float("nan"),
    }
    from rwkv_opt.checkpoint.synth import preset_config

    n = preset_config(size).n_params()
    row.update({"params_b": n / 1e9, "fp32_gib": n * 4 / 2**30})
    row["peak_over_fp32"] = row["peak_rss_gib"] / row["fp32_gib"]
    work.mkdir(parents=True, exist_ok=True)
    (work / f"{size}-{target}.log").write_text(p.stderr)  # the run's progress lines, kept
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith(("\t", "Command exited"))]
        row["error"] = lines[-1][:400] if lines else "?"
        return row
    man = json.loads((out / "manifest.json").read_text())
    row.update(
        {
            "artifact_gib": man.get("artifact_bytes", 0) / 2**30,
            **{f"{k}_s": v for k, v in man.get("phase_seconds", {}).items()},
        }
    )
    v = man.get("verification")
    row["verified"] = (
        ("skipped: " + v["skipped"])
        if v and "skipped" in v
        else (f"top-1 {v['top1']:.3f}, KL {v['mean_kl']:.1e}" if v else "off")
    )
    if v and "blocks_verified" in v:
        row["verified"] += f" (emb, blocks 0-{v['blocks_verified'] - 1} of {cfg_layers(size)}, head)"
    quant = man.get("quantization_algorithm")
    if quant:
        row["quantization"] = quant
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # the next run needs the disk
    return row


def cfg_layers(size: str) -> int:
    from rwkv_opt.checkpoint.synth import preset_config

    return preset_config(size).n_layer


def ran_through(r) -> bool:
    """The run did all its phases: it succeeded, or the verification at its end refused the artifact
    (exit 2: a synthetic checkpoint's near-flat logits miss the quantized budgets), not an up-front
    refusal or a crash."""
    err = str(r.get("error", "") or "")
    if r.get("rc", 0) == 0:
        return True
    return r.get("rc") == 2 and "needs about" not in err and (r.get("wall_s", 0) > 60 or "accuracy budget" in err)


def goals(df) -> list[str]:
    out = []
    for _, r in df.iterrows():
        if not ran_through(r):
            continue
        if r["size"] in ("1.5b", "2.9b") and r.get("mode", "verify") == "verify":
            ok = r["peak_over_fp32"] <= 1.25
            out.append(
                f"{r['size']} {r['target']}: peak {r['peak_rss_gib']:.2f} GiB = {r['peak_over_fp32']:.2f}x fp32 "
                f"({'meets' if ok else 'misses'} <= 1.25x)"
            )
        if r["size"] == "0.1b":
            ok = r["peak_rss_gib"] <= 1.5
            out.append(
                f"0.1b {r['target']}: peak {r['peak_rss_gib']:.2f} GiB ({'meets' if ok else 'misses'} <= 1.5 GiB)"
            )
        if r["size"] == "7.2b":
            ok = r["peak_rss_gib"] <= 22
            out.append(
                f"7.2b {r['target']}: peak {r['peak_rss_gib']:.2f} GiB ({'meets' if ok else 'misses'} <= 22 GiB)"
            )
        if r["size"] == "2.9b":
            limit = 30 if "int4" in r["target"] else 10
            ok = r["wall_s"] <= limit * 60
            out.append(f"2.9b {r['target']}: {r['wall_s'] / 60:.1f} min ({'meets' if ok else 'misses'} <= {limit} min)")
    return out


def plot(df, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[[ran_through(r) for _, r in df.iterrows()]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for target, g in ok.groupby("target"):
        g = g.sort_values("params_b")
        axes[0].plot(g["params_b"], g["peak_rss_gib"], "o-", label=target)
        axes[1].plot(g["params_b"], g["wall_s"] / 60, "o-", label=target)
    xs = sorted(ok["params_b"].unique())
    axes[0].plot(xs, [x * 4e9 / 2**30 for x in xs], "k--", lw=1, label="fp32 weight bytes")
    axes[0].plot(xs, [1.25 * x * 4e9 / 2**30 for x in xs], "k:", lw=1, label="1.25x fp32 (goal)")
    axes[0].axhline(22, color="grey", lw=1, ls="-.", label="22 GiB (7.2B goal, 24 GiB machine)")
    axes[0].set(xlabel="parameters (billions)", ylabel="peak RSS (GiB)", title="pipeline peak memory")
    axes[1].set(xlabel="parameters (billions)", ylabel="wall time (min)", title="pipeline wall time")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"rwkv-opt pipeline with verification, synthetic checkpoints, {cpu_name()}, {os.cpu_count()} cores", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["0.1b", "0.4b", "1.5b", "2.9b"])
    ap.add_argument("--targets", nargs="+", default=["cpu-fp32", "cuda-fp16", "cpu-int8", "cpu-int4", "cuda-int4"])
    ap.add_argument("--ckpt-dir", type=Path, default=Path("ckpt"))
    ap.add_argument("--work", type=Path, default=Path("build/scale"))
    ap.add_argument("--out", type=Path, default=Path("reports"))
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--json", type=Path, help="append rows here too (JSON lines), so runs can be merged")
    ap.add_argument(
        "--notes",
        type=Path,
        default=Path(__file__).with_name("scale_notes.md"),
        help="Markdown appended to the report (the measurements behind the design)",
    )
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from --json's rows")
    a = ap.parse_args(argv)
    import pandas as pd

    from rwkv_opt.bench.report import markdown_table

    rows = []
    for size in [] if a.report_only else a.sizes:
        ckpt = ensure_checkpoint(size, a.ckpt_dir)
        for target in a.targets:
            print(f"{size} {target} ...", flush=True)
            r = run_one(size, target, ckpt, a.work, not a.no_verify)
            print("  " + json.dumps(r), flush=True)
            rows.append(r)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    if a.json and a.json.exists():  # merge with earlier runs (latest row per size x target wins)
        rows = [json.loads(ln) for ln in a.json.read_text().splitlines() if ln.strip()]
    df = pd.DataFrame(rows)
    if "mode" not in df:
        df["mode"] = "verify"
    df["mode"] = df["mode"].fillna("verify")
    df = df.drop_duplicates(["size", "target", "mode"], keep="last")
    df = df.sort_values(
        ["target", "size"],
        key=lambda s: s.map(lambda v: float(v[:-1]) if v[-1] == "b" and v[:-1].replace(".", "").isdigit() else v),
    )
    a.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out / "scale.csv", index=False)
    plot(df, a.out / "scale.png")
    cols = [
        c
        for c in [
            "size",
            "target",
            "mode",
            "params_b",
            "fp32_gib",
            "peak_rss_gib",
            "peak_over_fp32",
            "wall_s",
            "build_s",
            "passes_s",
            "write_s",
            "verify_s",
            "artifact_gib",
            "quantization",
            "verified",
            "error",
        ]
        if c in df
    ]
    md = [
        "# Pipeline scale: memory and time against model size\n",
        f"`python benchmarks/scale.py --sizes SIZE... --targets TARGET...` (one sequential run per row, "
        f"merged with --json) on "
        f"{cpu_name()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
        "synthetic bf16 checkpoints; peak RSS from /usr/bin/time -v.\n",
        markdown_table(df, cols),
        "\n## Goals\n",
        *[f"- {g}" for g in goals(df)],
        "\n![peak RSS and wall time against parameters](scale.png)\n",
        a.notes.read_text() if a.notes and a.notes.exists() else "",
    ]
    (a.out / "scale.md").write_text("\n".join(md) + "\n")
    print(f"wrote {a.out / 'scale.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
