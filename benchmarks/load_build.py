"""Time and peak memory of reading a bf16 .pth (torch-free, mmap) and building its fp32 graph.

    python benchmarks/load_build.py --preset 0.1b [--out reports/load-build-0.1b.md]

Each phase runs in a fresh process so its peak RSS is its own: (1) read + validate the
checkpoint and touch every tensor, (2) read + build the base graph + save model.onnx.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import numpy as np
from pathlib import Path
from rwkv_opt.checkpoint.weights import load_weights
phase, ckpt, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
t0 = time.perf_counter()
w = load_weights(ckpt, digest=False)
if phase == "read":
    s = sum(float(np.asarray(w.raw[k][..., :1], np.float32).sum()) for k in w.raw)  # touch each tensor
    for k in w.raw:
        np.asarray(w.raw[k]).view(np.uint8).sum()  # touch every page
    t_read = time.perf_counter() - t0
    res = {"read_s": t_read}
else:
    from rwkv_opt.graph.model import build_model
    from rwkv_opt.artifact import save_model
    t1 = time.perf_counter()
    m = build_model(w)
    t2 = time.perf_counter()
    save_model(m, out / "model.onnx")
    res = {"read_s": t1 - t0, "build_s": t2 - t1, "save_s": time.perf_counter() - t2,
           "onnx_bytes": sum(f.stat().st_size for f in out.glob("model.onnx*"))}
status = Path("/proc/self/status").read_text()
res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
res["rss_anon_mb_end"] = int([l for l in status.splitlines() if l.startswith("RssAnon")][0].split()[1]) / 1024
print(json.dumps(res))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="0.1b")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        ckpt = d / "model.pth"
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "rwkv_opt.cli", "synth", "--preset", a.preset, "-o", str(ckpt)],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        t_synth = time.perf_counter() - t0
        size_mb = ckpt.stat().st_size / 2**20
        res = {}
        for phase in ("read", "build"):
            r = subprocess.run(
                [sys.executable, "-c", CHILD, phase, str(ckpt), str(d)],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            res[phase] = json.loads(r.stdout.strip().splitlines()[-1])
    rd, bd = res["read"], res["build"]
    lines = [
        f"### {a.preset} synthetic, bf16 .pth of {size_mb:.0f} MiB (synth wrote it in {t_synth:.1f}s)",
        "",
        "| phase | seconds | peak RSS (MiB) | private RSS at end (MiB) |",
        "|---|---|---|---|",
        f"| read + validate + touch every page (mmap, zero copy) | {rd['read_s']:.2f} | {rd['peak_rss_mb']:.0f} | "
        f"{rd['rss_anon_mb_end']:.0f} |",
        f"| read + build fp32 graph + save ({bd['onnx_bytes'] / 2**20:.0f} MiB onnx) | "
        f"{bd['read_s'] + bd['build_s'] + bd['save_s']:.2f} (read {bd['read_s']:.2f}, build {bd['build_s']:.2f}, "
        f"save {bd['save_s']:.2f}) | {bd['peak_rss_mb']:.0f} | {bd['rss_anon_mb_end']:.0f} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
