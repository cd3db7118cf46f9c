"""`rwkv-opt convert` speed as a fraction of disk read bandwidth (issue 16's goal: >= 0.8 at 1.5B).

    python benchmarks/convert.py --preset 1.5b [--drop-caches] [--out reports/convert-1.5b.md]

A synthetic bf16 .pth of the preset is written first (not timed), then converted to safetensors
and to an fla-hub folder, and each of those back to .pth. For every conversion the source file is
read once with `cat FILE > /dev/null`, copied once (`cat FILE > COPY; sync COPY`: the same bytes read,
written and fsynced, the floor of any converter) and then converted, each timed in its own process;
`ratio` is cat time / convert time (the issue's measure), `copy_ratio` copy time / convert time.
Convert time includes the interpreter's start (about a second on a loaded 2-core machine; noise at
1.5B, everything at the tiny preset). Peak RSS is the converting process's own, to check that it holds
about one tensor at a time.
With --drop-caches (root) the page cache is emptied before each timed step, so both read the disk;
without it both read warm pages, which measures the copy path rather than the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = [
    ("m.pth", "safetensors", "m.safetensors"),
    ("m.pth", "hf", "hf"),
    ("m.safetensors", "pth", "st.pth"),
    ("hf", "pth", "hf.pth"),
]


def _drop_caches(enabled: bool) -> None:
    if enabled:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _timed(cmd: list[str], **kw) -> tuple[float, float]:
    """(seconds, peak RSS MiB of that one child) of one command."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, **kw)
    _, status, usage = os.wait4(child.pid, 0)
    took = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, cmd)
    return took, usage.ru_maxrss / 1024


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) if path.is_dir() else path.stat().st_size


def _cat(path: Path) -> list[str]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return ["sh", "-c", "cat " + " ".join(f"'{f}'" for f in files) + " > /dev/null"]


def _copy(path: Path, work: Path) -> list[str]:
    """The floor for any converter: the same bytes read and written to a file, then fsynced."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    srcs = " ".join(f"'{f}'" for f in files)
    return ["sh", "-c", f"cat {srcs} > '{work / 'copy.tmp'}' && sync '{work / 'copy.tmp'}' && rm '{work / 'copy.tmp'}'"]


def run(preset: str, drop: bool, work: Path) -> list[dict]:
    subprocess.run(
        [sys.executable, "-m", "rwkv_opt.cli", "synth", "--preset", preset, "-o", str(work / "m.pth")],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    rows = []
    for src, to, out in STEPS:
        _drop_caches(drop)
        t_cat, _ = _timed(_cat(work / src))
        _drop_caches(drop)
        t_copy, _ = _timed(_copy(work / src, work))
        _drop_caches(drop)
        t_conv, rss = _timed(
            [sys.executable, "-m", "rwkv_opt.cli", "convert", str(work / src), "--to", to, "-o", str(work / out)],
            stdout=subprocess.DEVNULL,
        )
        rows.append(
            {
                "from": src,
                "to": to,
                "bytes": _size(work / src),
                "cat_s": round(t_cat, 3),
                "copy_s": round(t_copy, 3),
                "convert_s": round(t_conv, 3),
                "ratio": round(t_cat / t_conv, 3),
                "copy_ratio": round(t_copy / t_conv, 3),
                "peak_rss_mib": round(rss),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1.5b")
    ap.add_argument("--drop-caches", action="store_true", help="empty the page cache before each timed step (root)")
    ap.add_argument("--dir", type=Path, help="work folder on the disk to measure (default: a temp folder)")
    ap.add_argument("--out", type=Path, help="also write a markdown table here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        rows = run(a.preset, a.drop_caches, Path(d))
    for r in rows:
        print(json.dumps(r))
    if a.out:
        lines = [
            f"# rwkv-opt convert, preset {a.preset} ({'cold' if a.drop_caches else 'warm'} page cache)",
            "",
            "| from | to | MiB | cat s | copy s | convert s | cat/convert | copy/convert | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['from']} | {r['to']} | {r['bytes'] / 2**20:.0f} | {r['cat_s']} | {r['copy_s']} | {r['convert_s']} | "
            f"{r['ratio']} | {r['copy_ratio']} | {r['peak_rss_mib']} |"
            for r in rows
        ]
        a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
