"""What a Session costs to make and run, with and without cpu-int4's int8 twins (graph/int8_twins.py).

    python benchmarks/session_load.py ARTIFACT [--rounds 2] [--prompt 128] [--steps 10] [--threads 2]

Each round runs two fresh processes in turn, `Session(ARTIFACT, int8_twins=False)` then the default
Session (twins where the artifact has 4-bit block MatMulNBits), and reports per process: load seconds,
RSS after load and the load's peak (VmHWM) above the interpreter's, prefill tok/s (median of 3 calls of
--prompt tokens after a warm-up) and decode ms/token (median of --steps stepper steps after 2). The
figures of reports/decode.md and reports/scale.md, session 8, at 1.5B come from this.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def measure(artifact: str, twins: bool, prompt: int, steps: int, threads: int) -> dict:
    import numpy as np

    from rwkv_opt.progress import peak_rss_bytes, rss_bytes
    from rwkv_opt.runtime import Session

    base = rss_bytes() / 2**30
    t0 = time.perf_counter()
    s = Session(artifact, threads=threads, int8_twins=None if twins else False)
    load = time.perf_counter() - t0
    after, peak = rss_bytes() / 2**30 - base, peak_rss_bytes() / 2**30 - base
    toks = np.random.default_rng(0).integers(0, s.config.vocab, (1, prompt))
    s.forward(toks)
    pre = []
    for _ in range(3):
        t0 = time.perf_counter()
        _, state = s.forward(toks)
        pre.append(time.perf_counter() - t0)
    stepper, dec = s.stepper(state), []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        stepper.step(toks[:, i % prompt : i % prompt + 1])
        dec.append(time.perf_counter() - t0)
    return {
        "twins": s.int8_twins,
        "load_s": load,
        "rss_after_load_gib": after,
        "load_peak_gib": peak,
        "prefill_tok_s": prompt / statistics.median(pre),
        "decode_ms": 1e3 * statistics.median(dec[2:]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["plain", "twins"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(measure(a.artifact, a.child == "twins", a.prompt, a.steps, a.threads)))
        return 0
    common = [a.artifact, "--prompt", str(a.prompt), "--steps", str(a.steps), "--threads", str(a.threads)]
    for r in range(a.rounds):
        for mode in ("plain", "twins"):
            out = subprocess.run([sys.executable, __file__, *common, "--child", mode], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"the {mode} process failed: {out.stderr.strip().splitlines()[-1:]}")
            m = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"round {r + 1} {mode} (twins: {m['twins']}): load {m['load_s']:.1f} s, RSS after load "
                f"+{m['rss_after_load_gib']:.2f} GiB (load peak +{m['load_peak_gib']:.2f}), prefill T={a.prompt} "
                f"{m['prefill_tok_s']:.0f} tok/s, decode {m['decode_ms']:.1f} ms",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
