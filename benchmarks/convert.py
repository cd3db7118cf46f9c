"""`rwkv-opt convert` speed against the disk (issue 16's goal: >= 0.8x of `cat FILE > /dev/null` at 1.5B).

    python benchmarks/convert.py --preset 1.5b --cache cold,warm --repeat 3 [--baseline DIR] [--out FILE.md]

A synthetic bf16 .pth of the preset (or --source FILE) is converted once to safetensors and to an fla-hub
folder (not timed); then every direction between the three layouts is timed. For each direction and
repeat, in this order, each in its own process:

  * ``cat``: ``cat SRC > /dev/null``, the issue's measure of disk read bandwidth;
  * ``write``: ``head -c BYTES /dev/zero > TMP && sync TMP``, the disk's write bandwidth alone;
  * ``copy``: ``cp SRC TMP && sync TMP``, the same bytes read, written and flushed: the floor of any
    converter that writes its output durably;
  * ``convert``: ``python -m rwkv_opt.cli convert SRC --to LAYOUT -o OUT`` from this checkout (one fsync
    before the atomic rename included; so is the interpreter's start, about 0.3-1 s);
  * ``baseline`` (with --baseline DIR): the same command run from another checkout, e.g. the commit
    before a change, so before and after come from the same run on the same disk.

``cat/convert`` is the issue's ratio, ``copy/convert`` the ratio to the copy floor. Each row gives the
median over the repeats and, in brackets, the min..max of the ratio. ``--cache cold`` empties the page
cache (root) before every timed command, so reads hit the disk; ``warm`` reads the source from memory
first (it then measures the copy path, not the disk). Outputs are removed after each timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"pth": "m.pth", "safetensors": "m.safetensors", "hf": "hf"}
OUTPUTS = {"pth": "out.pth", "safetensors": "out.safetensors", "hf": "out-hf"}
DIRECTIONS = [(a, b) for a in SOURCES for b in SOURCES if a != b]


def _files(path: Path) -> list[Path]:
    """The weight bytes of a layout: the file, or a folder's safetensors files."""
    return sorted(path.glob("*.safetensors")) if path.is_dir() else [path]


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _warm(path: Path) -> None:
    subprocess.run(["sh", "-c", "cat " + " ".join(f"'{f}'" for f in _files(path)) + " > /dev/null"], check=True)


def _timed(cmd: list[str], cwd: Path = ROOT) -> tuple[float, float]:
    """(seconds, peak RSS MiB of that one child) of one command."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    took = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise subprocess.CalledProcessError(os.waitstatus_to_exitcode(status), cmd)
    return took, usage.ru_maxrss / 1024


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _commands(src: Path, to: str, work: Path, baseline: Path | None) -> dict[str, tuple[list[str], Path, Path]]:
    """name -> (command, cwd, what it writes) for one direction."""
    files = " ".join(f"'{f}'" for f in _files(src))
    tmp = work / "floor.tmp"
    nbytes = sum(f.stat().st_size for f in _files(src))
    out = work / OUTPUTS[to]
    convert = [sys.executable, "-m", "rwkv_opt.cli", "convert", str(src), "--to", to, "-o", str(out)]
    cmds = {
        "cat": (["sh", "-c", f"cat {files} > /dev/null"], ROOT, tmp),
        "write": (["sh", "-c", f"head -c {nbytes} /dev/zero > '{tmp}' && sync '{tmp}'"], ROOT, tmp),
        "copy": (
            [
                "sh",
                "-c",
                f"cat {files} > '{tmp}' && sync '{tmp}'" if src.is_dir() else f"cp '{src}' '{tmp}' && sync '{tmp}'",
            ],
            ROOT,
            tmp,
        ),
        "convert": (convert, ROOT, out),
    }
    if baseline is not None:
        cmds["baseline"] = (convert, baseline, out)
    return cmds


def measure(work: Path, cache: str, repeat: int, baseline: Path | None) -> list[dict]:
    """One row per direction: every command's seconds over the repeats."""
    rows = []
    for frm, to in DIRECTIONS:
        src = work / SOURCES[frm]
        times: dict[str, list[float]] = {}
        rss: list[float] = []
        for _ in range(repeat):
            for name, (cmd, cwd, wrote) in _commands(src, to, work, baseline).items():
                _drop_caches() if cache == "cold" else _warm(src)
                took, peak = _timed(cmd, cwd)
                times.setdefault(name, []).append(took)
                rss += [peak] if name == "convert" else []
                _remove(wrote)
        row = {"from": frm, "to": to, "cache": cache, "bytes": sum(f.stat().st_size for f in _files(src))}
        row.update({f"{n}_s": [round(t, 3) for t in ts] for n, ts in times.items()})
        row["peak_rss_mib"] = round(max(rss))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _ratio(row: dict, num: str, den: str) -> str:
    """median (min..max) of num/den over the repeats, pairing the same repeat."""
    r = [a / b for a, b in zip(row[f"{num}_s"], row[f"{den}_s"])]
    return f"{statistics.median(r):.2f} ({min(r):.2f}..{max(r):.2f})"


def table(rows: list[dict]) -> list[str]:
    base = "baseline_s" in rows[0]
    head = "| cache | from | to | MiB | cat s | write s | copy s | convert s | cat/convert | copy/convert |"
    head += " baseline s | copy/baseline |" if base else ""
    head += " peak RSS MiB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        med = {k: statistics.median(v) for k, v in r.items() if k.endswith("_s")}
        line = (
            f"| {r['cache']} | {r['from']} | {r['to']} | {r['bytes'] / 2**20:.0f} | {med['cat_s']:.2f} | "
            f"{med['write_s']:.2f} | {med['copy_s']:.2f} | {med['convert_s']:.2f} | {_ratio(r, 'cat', 'convert')} | "
            f"{_ratio(r, 'copy', 'convert')} |"
        )
        line += f" {med['baseline_s']:.2f} | {_ratio(r, 'copy', 'baseline')} |" if base else ""
        lines.append(line + f" {r['peak_rss_mib']} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1.5b", help="synthetic preset to make the source from")
    ap.add_argument("--source", type=Path, help="a BlinkDL .pth to start from instead of a synthetic one")
    ap.add_argument("--cache", default="cold,warm", help="cold (drop the page cache before each step; root), warm")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="another checkout of rwkv-opt to time the same commands with")
    ap.add_argument("--dir", type=Path, help="work folder on the disk to measure (default: a temp folder)")
    ap.add_argument("--out", type=Path, help="also write a markdown table here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        work = Path(d)
        if a.source:
            shutil.copyfile(a.source, work / SOURCES["pth"])
        else:
            synth = [sys.executable, "-m", "rwkv_opt.cli", "synth", "--preset", a.preset, "-o", str(work / "m.pth")]
            subprocess.run(synth, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        for to in ("safetensors", "hf"):
            cmd = ["convert", str(work / "m.pth"), "--to", to, "-o", str(work / SOURCES[to])]
            subprocess.run(
                [sys.executable, "-m", "rwkv_opt.cli", *cmd], check=True, cwd=ROOT, stdout=subprocess.DEVNULL
            )
        rows = [row for cache in a.cache.split(",") for row in measure(work, cache, a.repeat, a.baseline)]
    if a.out:
        title = f"# rwkv-opt convert, {a.source or 'preset ' + a.preset}: median of {a.repeat} (min..max of the ratio)"
        a.out.write_text("\n".join([title, "", *table(rows)]) + "\n")


if __name__ == "__main__":
    main()
