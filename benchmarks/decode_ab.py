"""Interleaved A/B of decode and prefill speed: artifacts x ORT session config entries, in one run.

    python benchmarks/decode_ab.py --variant fp32=ART_FP32 --variant fp32+nopack=ART_FP32@session.disable_prepacking=1 \
        --variant int4=ART_INT4 --variant int4+lora8=ART_INT4_LORA8 [--rounds 5] [--decode 32] [--prefill 512] \
        [--threads 2] [-o reports/decode-ab.md]

A variant is NAME=ARTIFACT[@key=value[@key=value...]]: the artifact run with the session options of
`rwkv_opt.runtime.session.session_options` plus those ORT session config entries; the entry
rwkv_opt.decode_graph=1 is ours, not ORT's: Session(decode_graph=True), graph/decode.py's T == 1 path
for one-token calls; so is rwkv_opt.stepper=0: decode steps through Session.forward (fresh output arrays)
instead of Session.stepper (runtime/stepper.py, what `rwkv-opt generate` uses: buffers reused); and
rwkv_opt.int8_twins=0: Session(int8_twins=False), a 4-bit artifact on its own 4-bit kernels.
NAME's part before its last '+' names its baseline, so `int4+lora8` is compared with `int4` and
`int4+lora8+b64` with `int4+lora8`.

Every measurement is a fresh process; each round runs every variant once, the order rotating per round.
Inside a process: prefill of --prefill random tokens from the zero state (one warm-up, median of 3 calls,
tok/s), then decode: a 128-token prompt, 3 warm-up steps, --decode single-token steps (median ms/token).
Ratios are the median over rounds of the per-round paired ratio variant / baseline, so load that hits a
whole round hits both sides. The memory-bandwidth floor is measured in the same run, before and after the
rounds: numpy GEMVs (x @ W, fp32) over the 0.1B model's projection shapes (516 MiB, far above the L2); the
best GB/s seen. A variant's floor = the weight bytes one decode step reads (benchmarks/decode_profile.py)
/ that bandwidth. The same GEMVs also run as one ORT graph of MatMuls, with and without prepacked weights,
and as Gemm(transB), and with 1 thread, each in its own process: the 'gemv' table, which says how close
ORT's kernels get to numpy's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import decode_profile  # noqa: E402  (a sibling script, importable once HERE is on the path)
from bandwidth import cpu_description  # noqa: E402

PROMPT, WARMUP, PREFILL_REPS = 128, 3, 3
DECODE_GRAPH_ENTRY = "rwkv_opt.decode_graph"  # @rwkv_opt.decode_graph=1: the decode path (graph/decode.py)
STEPPER_ENTRY = "rwkv_opt.stepper"  # @rwkv_opt.stepper=0: decode through Session.forward, not Session.stepper
INT8_TWINS_ENTRY = "rwkv_opt.int8_twins"  # @rwkv_opt.int8_twins=0: Session(int8_twins=False)
GEMV_SHAPES = [(768, 768)] * 48 + [(768, 3072), (3072, 768)] * 12 + [(768, 65536)]


# ---- inside a measuring process -----------------------------------------------------------------
def _patch_session_options(entries: dict[str, str]) -> None:
    """Make rwkv_opt's Session add these ORT config entries to its usual options."""
    from rwkv_opt.runtime import session as S

    base = S.session_options

    def patched(*args, **kw):
        so = base(*args, **kw)
        for k, v in entries.items():
            so.add_session_config_entry(k, v)
        return so

    S.session_options = patched


def measure(art: str, entries: dict[str, str], threads: int, decode: int, prefill: int) -> dict:
    entries = dict(entries)
    decode_graph = entries.pop(DECODE_GRAPH_ENTRY, "0") == "1"
    use_stepper = entries.pop(STEPPER_ENTRY, "1") == "1"
    int8_twins = entries.pop(INT8_TWINS_ENTRY, "1") == "1"
    _patch_session_options(entries)
    from rwkv_opt.runtime import Session

    from rwkv_opt.progress import rss_bytes

    rss0 = rss_bytes()
    s = Session(art, threads=threads, decode_graph=decode_graph, int8_twins=int8_twins)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, s.config.vocab, (1, prefill))
    s.forward(toks)
    times = []
    for _ in range(PREFILL_REPS):
        t0 = time.perf_counter()
        s.forward(toks)
        times.append(time.perf_counter() - t0)
    _, st = s.forward(toks[:, :PROMPT])
    steps = rng.integers(0, s.config.vocab, (1, WARMUP + decode))
    stepper = s.stepper(st) if use_stepper else None
    dec = []
    for i in range(steps.shape[1]):
        t0 = time.perf_counter()
        if stepper is not None:
            stepper.step(steps[:, i : i + 1])
        else:
            _, st = s.forward(steps[:, i : i + 1], st)
        if i >= WARMUP:
            dec.append(time.perf_counter() - t0)
    return {
        "prefill_tok_s": prefill / statistics.median(times),
        "decode_ms": statistics.median(dec) * 1e3,
        "load_1m": os.getloadavg()[0],
        "rss_mb": (rss_bytes() - rss0) / 2**20,  # what the session(s) hold after prefill and decode
        "decode_path": s.decode_path,
    }


def _gemv_ort(ws: list[np.ndarray], threads: int, mode: str):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    for i, w in enumerate(ws):
        if mode == "gemm_transB":
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
            nodes.append(helper.make_node("Gemm", [f"x{w.shape[0]}", f"w{i}"], [f"y{i}"], transB=1))
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [f"x{w.shape[0]}", f"w{i}"], [f"y{i}"]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    ins = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in (768, 3072)]
    m = helper.make_model(
        helper.make_graph(nodes, "gemv", ins, outs, inits), opset_imports=[helper.make_opsetid("", 21)]
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if mode == "matmul_unpacked":
        so.add_session_config_entry("session.disable_prepacking", "1")
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {f"x{k}": np.ones((1, k), np.float32) for k in (768, 3072)}
    return lambda: s.run(None, feed)


GEMV_MODES = ("numpy", "matmul_prepacked", "matmul_unpacked", "gemm_transB", "matmul_prepacked_1thread")


def gemv(mode: str, threads: int, reps: int = 10) -> float:
    """GB/s (best of reps, weight bytes read per second) of one pass of GEMVs over GEMV_SHAPES, by `mode`.
    One mode per process: another ORT pool's (or OpenBLAS's) spinning threads in the same process take
    the second core and halve the figure of whichever kernel runs next (seen: 13 vs 25 GB/s)."""
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(s, dtype=np.float32) for s in GEMV_SHAPES]
    xs = {k: np.ones(k, np.float32) for k in (768, 3072)}
    if mode == "numpy":

        def run():
            return [xs[w.shape[0]] @ w for w in ws]

    else:
        run = _gemv_ort(ws, 1 if mode.endswith("_1thread") else threads, mode.removesuffix("_1thread"))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return sum(w.nbytes for w in ws) / best / 1e9


def gemv_table(threads: int) -> dict[str, float]:
    """GB/s per GEMV_MODES entry, each in a fresh process."""
    return {m: child(["--gemv", m, "--threads", str(threads)])["gbps"] for m in GEMV_MODES}


# ---- the driver ---------------------------------------------------------------------------------
OURS = (DECODE_GRAPH_ENTRY, STEPPER_ENTRY, INT8_TWINS_ENTRY)


@functools.cache
def _ort_binaries() -> tuple[bytes, ...]:
    import onnxruntime

    capi = Path(onnxruntime.__file__).parent / "capi"
    return tuple(f.read_bytes() for f in capi.glob("onnxruntime_pybind11_state*"))


def ort_knows(key: str) -> bool:
    """Whether this onnxruntime build names session config entry `key` anywhere in its binary. ORT accepts any
    key and ignores the ones it does not know, so a misspelt entry would A/B nothing (session 8 timed
    "session.intra_op.dynamic_block_base", which is not a key; "session.dynamic_block_base" is)."""
    return any(key.encode() in b for b in _ort_binaries())


def parse_variant(spec: str) -> tuple[str, str, dict[str, str]]:
    """NAME=ARTIFACT[@key=value...]; a key neither ours nor known to onnxruntime is refused."""
    name, _, rest = spec.partition("=")
    art, *kvs = rest.split("@")
    if not name or not art or any("=" not in kv for kv in kvs):
        raise SystemExit(f"decode_ab.py: --variant {spec!r} is not NAME=ARTIFACT[@key=value...]")
    entries = dict(kv.split("=", 1) for kv in kvs)
    unknown = [k for k in entries if k not in OURS and not ort_knows(k)]
    if unknown:
        raise SystemExit(
            f"decode_ab.py: --variant {name}: onnxruntime knows no session config entry {unknown[0]!r} (it would "
            f"ignore it and the A/B would measure nothing); ours are {', '.join(OURS)}."
        )
    return name, art, entries


def child(cmd: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *cmd], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(a) -> dict:
    variants = [parse_variant(v) for v in a.variant]
    wbytes = {
        art: sum(decode_profile.report(Path(art), a.threads, 0, 0)["weight_bytes"].values()) for _, art, _ in variants
    }
    bw = [gemv_table(a.threads)]
    print(f"gemv GB/s: {bw[0]}", file=sys.stderr)
    rows = []
    for r in range(a.rounds):
        k = r % len(variants)
        for name, art, entries in variants[k:] + variants[:k]:
            res = child(
                [
                    "--measure",
                    art,
                    "--entries",
                    json.dumps(entries),
                    "--threads",
                    str(a.threads),
                    "--decode",
                    str(a.decode),
                    "--prefill",
                    str(a.prefill),
                ]
            )
            rows.append({"round": r, "variant": name, **res})
            print(
                f"round {r + 1}: {name}: decode {res['decode_ms']:.2f} ms, prefill {res['prefill_tok_s']:.0f} tok/s, "
                f"load {res['load_1m']:.2f}",
                file=sys.stderr,
            )
    bw.append(gemv_table(a.threads))
    return {
        "cpu": cpu_description(),
        "variants": [{"name": n, "artifact": art, "entries": e, "weight_bytes": wbytes[art]} for n, art, e in variants],
        "gemv_gbps": bw,
        "rows": rows,
        "threads": a.threads,
        "decode": a.decode,
        "prefill": a.prefill,
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "command": " ".join(sys.argv),
    }


def _paired(rows: list[dict], name: str, base: str, key: str) -> float:
    by = {(r["round"], r["variant"]): r[key] for r in rows}
    return statistics.median(by[rd, name] / by[rd, base] for rd in {r["round"] for r in rows})


def markdown(d: dict) -> str:
    numpy_bw = max(b["numpy"] for b in d["gemv_gbps"])
    lines = [
        f"- CPU: {d['cpu']}",
        f"- date: {d['date']}; {d['threads']} threads; `{d['command']}`",
        f"- numpy GEMV bandwidth (best before/after): {numpy_bw:.1f} GB/s",
        "",
        (
            f"| variant | decode ms/token | x baseline | floor ms | x floor | prefill T={d['prefill']} tok/s "
            "| x baseline | session RSS MiB |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = d["rows"]
    for v in d["variants"]:
        name, base = v["name"], v["name"].rsplit("+", 1)[0]
        mine = [r for r in rows if r["variant"] == name]
        dec = statistics.median(r["decode_ms"] for r in mine)
        pre = statistics.median(r["prefill_tok_s"] for r in mine)
        floor = v["weight_bytes"] / numpy_bw / 1e6
        rd = f"{_paired(rows, name, base, 'decode_ms'):.3f}" if base != name else "1"
        rp = f"{_paired(rows, name, base, 'prefill_tok_s'):.3f}" if base != name else "1"
        rss = statistics.median(r.get("rss_mb", float("nan")) for r in mine)
        lines.append(f"| {name} | {dec:.2f} | {rd} | {floor:.2f} | {dec / floor:.2f} | {pre:.0f} | {rp} | {rss:.0f} |")
    lines += [
        "",
        "GEMV GB/s over 516 MiB of fp32 0.1B-shaped weights (best of 10, before / after the rounds):",
        "",
        "| kernel | before | after |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {d['gemv_gbps'][0][k]:.1f} | {d['gemv_gbps'][-1][k]:.1f} |" for k in d["gemv_gbps"][0]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", default=[], help="NAME=ARTIFACT[@key=value...]")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", type=Path, default=HERE.parent / "reports" / "decode-ab.md")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--entries", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--gemv", choices=GEMV_MODES, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.gemv:
        print(json.dumps({"gbps": gemv(a.gemv, a.threads)}))
        return 0
    if a.measure:
        print(json.dumps(measure(a.measure, json.loads(a.entries), a.threads, a.decode, a.prefill)))
        return 0
    d = run(a)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.with_suffix(".json").write_text(json.dumps(d, indent=1))
    text = markdown(d)
    a.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
