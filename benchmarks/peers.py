"""rwkv-opt on CPU vs BlinkDL's official `rwkv` package and, when a build is present, llama.cpp, in one run.

    python benchmarks/peers.py --preset 0.1b --runs 5 -o reports/peers.md [--llama-cpp DIR]

All read the same synthetic checkpoint (WORK/synth-P-v65536.pth: `rwkv-opt synth --preset P` with the
65536-token World vocabulary, which llama.cpp's converter needs; benchmarks/llamacpp.py). Runners: "ours"
(our cpu-fp32 artifact), "theirs" (the official package, torch 'cpu fp32'), "ours-int8" and "ours-int4"
(cpu-int8 / cpu-int4 artifacts, built --no-verify --quant-algorithm rtn), and with a llama.cpp build
(--llama-cpp DIR, $LLAMA_CPP_DIR, or llama-bench on PATH) "llama-f32", "llama-q8_0", "llama-q4_0":
llama-bench on GGUFs of the checkpoint (our fla-hub folder -> convert_hf_to_gguf.py -> llama-quantize).
Every measurement runs in a fresh subprocess (so peak RSS is that runner's own), the runners alternate
and reverse their order each round, and the tables show medians over rounds. Inside one subprocess:
prefill at each prompt length is timed after one warm-up call (median of 3); decode is timed step by
step after a 128-token prompt and 3 warm-up steps (p50 of --decode steps). llama-bench runs the same
prompt lengths and --decode generated tokens (from an empty state: an RWKV step costs the same at any
position), 3 repetitions after its own warm-up: prefill is the median repetition's tok/s, decode
1000 / tg tok/s of the median repetition (p50) and of the slowest (p95). All use
--threads threads (ORT intra-op threads; torch.set_num_threads; llama-bench -t). The memory-bandwidth
floor (benchmarks/bandwidth.py: best of numpy copy and read-only bandwidth, measured in the same run)
bounds any fp32 decode from below. A further runner, "matmuls", times one decode step's weight GEMMs alone
for each of our artifacts ("matmuls", "matmuls-int8", "matmuls-int4": every MatMul over a 2-D weight,
DynamicQuantizeMatMul and MatMulNBits, as our Session runs them, each fed a (1, K) input, in one ORT graph
with the same threads): what ORT's own kernels need to stream the weights, so ours minus it is what the
rest of our graph costs, and GEMMs alone slower than a decode goal allows says no graph meets it. The
machine's 1-minute load is recorded around each subprocess. The report ends with the issue's goals (decode
and prefill ratios at each bit width) and whether each holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bandwidth  # noqa: E402
import llamacpp  # noqa: E402

from rwkv_opt.errors import RwkvOptError  # noqa: E402

PREFILL_REPS = 3
OUR_TARGETS = {"ours": "cpu-fp32", "ours-int8": "cpu-int8", "ours-int4": "cpu-int4"}
# the measuring order of a round (reversed every other round): each of ours next to its peer at that bit width
RUNNERS = ("ours", "theirs", "llama-f32", "ours-int8", "llama-q8_0", "ours-int4", "llama-q4_0")
WARMUP_STEPS = 3
DECODE_PROMPT = 128


# ---- inside a measuring subprocess ------------------------------------------------------------
def peak_rss_mb() -> float:
    """VmHWM of this process image (ru_maxrss would carry the forking parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _runner(kind: str, model: str, threads: int):
    """(load seconds, seq(tokens) -> state, step(token, state) -> state) for ours or theirs."""
    t0 = time.perf_counter()
    if kind == "ours":
        from rwkv_opt.runtime import Session

        s = Session(model, threads=threads)
        seq = lambda toks: s.forward(np.asarray([toks]))[1]  # noqa: E731

        def step(tok, st):  # decode as `rwkv-opt generate` does: Session.stepper, its buffers reused
            stepper = st if hasattr(st, "step") else s.stepper(st)
            stepper.step(np.asarray([[tok]]))
            return stepper

        return time.perf_counter() - t0, seq, step
    os.environ["RWKV_V7_ON"] = "1"  # read when `rwkv` is imported
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    from rwkv.model import RWKV

    m = RWKV(model=model[:-4] if model.endswith(".pth") else model, strategy="cpu fp32")
    return time.perf_counter() - t0, (lambda toks: m.forward(toks, None)[1]), (lambda tok, st: m.forward([tok], st)[1])


GEMM_OPS = ("MatMul", "DynamicQuantizeMatMul", "MatMulNBits")


def _matmuls_model(path: Path, twins: bool = True):
    """(model, the int8 twins' arrays, weight bytes): every GEMM of model file `path` that has a weight operand
    -- MatMul over a 2-D float weight, DynamicQuantizeMatMul, MatMulNBits -- each on an (M, K) input `x{K}`
    (the head's on a (1, K) input `head_x{K}`, as our graph runs it on the last position only): at M = 1 one
    decode step's weight-reading kernels alone, at M = T a prompt's, as our Session runs them (with `twins`,
    a 4-bit artifact's block GEMMs on their int8 twins, graph/int8_twins.py), the rest of the graph left out.
    Weights stay on disk."""
    from onnx import TensorProto, helper

    from rwkv_opt.artifact import load_proto
    from rwkv_opt.graph.contract import Scope
    from rwkv_opt.graph.int8_twins import applies, with_int8_twins

    m = load_proto(path)
    m, arrays = (with_int8_twins(m, path.parent) if twins and applies(m) else None) or (m, {})
    inits = {t.name: t for t in m.graph.initializer}
    nodes, outs, ins, used = [], [], {}, {}
    for n in m.graph.node:
        w = inits.get(n.input[1]) if n.op_type in GEMM_OPS and len(n.input) > 1 else None
        if w is None or (n.op_type == "MatMul" and (len(w.dims) != 2 or w.data_type != TensorProto.FLOAT)):
            continue  # a MatMul of two activations (the WKV) or over a stacked weight is not a weight GEMV
        k = next((a.i for a in n.attribute if a.name == "K"), None) if n.op_type == "MatMulNBits" else w.dims[0]
        head = n.name.startswith(f"/{Scope.HEAD}/")
        x = f"head_x{k}" if head else f"x{k}"
        ins.setdefault(x, helper.make_tensor_value_info(x, TensorProto.FLOAT, [1 if head else "M", k]))
        node = helper.make_node(n.op_type, [x, *n.input[1:]], [f"y{len(nodes)}"], domain=n.domain)
        node.attribute.extend(n.attribute)
        nodes.append(node)
        outs.append(helper.make_tensor_value_info(f"y{len(nodes) - 1}", TensorProto.FLOAT, None))
        used.update((i, inits[i]) for i in n.input[1:] if i in inits)
    g = helper.make_graph(nodes, "matmuls", list(ins.values()), outs, list(used.values()))
    mm = helper.make_model(g, opset_imports=m.opset_import)
    nbytes = sum(
        int(np.prod(t.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize for t in used.values()
    )
    return mm, arrays, nbytes


def _matmuls_session(artifact: str, threads: int):
    """(weight bytes, an ORT session over _matmuls_model of `artifact`)."""
    import onnxruntime as ort

    from rwkv_opt.artifact import model_path
    from rwkv_opt.runtime.session import in_memory_model_options, session_options

    path = model_path(Path(artifact))
    mm, arrays, nbytes = _matmuls_model(path)
    so = session_options(threads)
    values = in_memory_model_options(so, path.parent, arrays)
    sess = ort.InferenceSession(mm.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del values  # ORT has copied them now
    return nbytes, sess


def measure_matmuls(model: str, prompt_lens: list[int], decode: int, threads: int) -> dict:
    """One step's weight GEMMs alone (M = 1), then a prompt's (M = T, the head at M = 1), as measure_runtime times
    decode and prefill."""
    load0 = os.getloadavg()[0]
    nbytes, sess = _matmuls_session(model, threads)
    rng = np.random.default_rng(0)

    def feed(m: int) -> dict:
        return {
            i.name: rng.standard_normal([m if d == "M" else d for d in i.shape]).astype(np.float32)
            for i in sess.get_inputs()
        }

    res = {}
    for T in prompt_lens:
        f = feed(T)
        sess.run(None, f)  # warm-up
        times = []
        for _ in range(PREFILL_REPS):
            t0 = time.perf_counter()
            sess.run(None, f)
            times.append(time.perf_counter() - t0)
        res[f"prefill_gemm_ms_{T}"] = statistics.median(times) * 1e3
    feed, times = feed(1), []
    for i in range(WARMUP_STEPS + decode):
        t0 = time.perf_counter()
        sess.run(None, feed)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - t0)
    return {
        **res,
        "kind": "matmuls",
        "weight_mib": nbytes / 2**20,
        "decode_ms_p50": float(np.percentile(times, 50)) * 1e3,
        "decode_ms_p95": float(np.percentile(times, 95)) * 1e3,
        "load_1m_start": load0,
        "load_1m_end": os.getloadavg()[0],
        "peak_rss_mb": peak_rss_mb(),
    }


def measure_llama(gguf: str, prompt_lens: list[int], decode: int, threads: int, build_dir: str) -> dict:
    """llama-bench on `gguf` (a child of this process, so RUSAGE_CHILDREN's peak RSS is its own)."""
    load0 = os.getloadavg()[0]
    build = llamacpp.find_build(build_dir)
    cmd = llamacpp.bench_command(build, Path(gguf), threads, prompt_lens, decode, PREFILL_REPS)
    res = llamacpp.parse_bench(llamacpp.run_tool(cmd, "llama-bench"))
    res.update(
        kind="llama",
        load_1m_start=load0,
        load_1m_end=os.getloadavg()[0],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    )
    return res


def measure(a) -> dict:
    """One runner's figures, in this (fresh) process: a.measure says how, a.model what."""
    lens = [int(x) for x in a.prompt_lens.split(",")]
    if a.measure == "matmuls":
        return measure_matmuls(a.model, lens, a.decode, a.threads)
    if a.measure == "llama":
        return measure_llama(a.model, lens, a.decode, a.threads, a.llama_cpp)
    return measure_runtime(a.measure, a.model, lens, a.decode, a.threads, a.vocab)


def measure_runtime(kind: str, model: str, prompt_lens: list[int], decode: int, threads: int, vocab: int) -> dict:
    """Ours or theirs: prefill at each prompt length, then decode step by step."""
    load0 = os.getloadavg()[0]
    load_s, seq, step = _runner(kind, model, threads)
    rng = np.random.default_rng(0)
    res = {"kind": kind, "load_s": load_s, "load_1m_start": load0}
    for T in prompt_lens:
        toks = [int(t) for t in rng.integers(0, vocab, T)]
        seq(toks)  # warm-up
        times = []
        for _ in range(PREFILL_REPS):
            t0 = time.perf_counter()
            seq(toks)
            times.append(time.perf_counter() - t0)
        res[f"prefill_tok_s_{T}"] = T / statistics.median(times)
    st = seq([int(t) for t in rng.integers(0, vocab, DECODE_PROMPT)])
    steps = [int(t) for t in rng.integers(0, vocab, WARMUP_STEPS + decode)]
    times = []
    for i, tok in enumerate(steps):
        t0 = time.perf_counter()
        st = step(tok, st)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - t0)
    res["decode_ms_p50"] = float(np.percentile(times, 50)) * 1e3
    res["decode_ms_p95"] = float(np.percentile(times, 95)) * 1e3
    res["peak_rss_mb"] = peak_rss_mb()
    res["load_1m_end"] = os.getloadavg()[0]
    return res


# ---- the driver ---------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(a, build: llamacpp.LlamaCpp | None) -> tuple[dict[str, tuple[str, Path]], dict]:
    """Runner name -> (measuring kind, model path), and our cpu-fp32 artifact's manifest. Writes the checkpoint,
    our artifacts (cpu-fp32 verified; cpu-int8/int4 --no-verify, RTN) and, with a build, the GGUFs if missing."""
    work = Path(a.work)
    ckpt = llamacpp.world_checkpoint(a.preset, work, progress=_log)
    art = Path(a.artifact) if a.artifact else work / f"{ckpt.stem}-cpu-fp32"
    runners = {"theirs": ("theirs", ckpt)}
    for name, target in OUR_TARGETS.items():
        out = art if name == "ours" else work / f"{ckpt.stem}-{target}"
        _log(f"building {out} ({target})")
        extra = () if name == "ours" else ("--no-verify", "--quant-algorithm", "rtn")
        runners[name] = ("ours", llamacpp.build_artifact(ckpt, target, out, *extra))
    if build is not None:
        for t, gguf in llamacpp.make_ggufs(build, ckpt, work, progress=_log).items():
            runners[f"llama-{t}"] = ("llama", gguf)
    return {n: runners[n] for n in RUNNERS if n in runners}, json.loads((art / "manifest.json").read_text())


def run_child(name: str, kind: str, model: Path, a, vocab: int) -> dict:
    """Runner `name` measured in a fresh process (`kind`: how to measure `model`)."""
    out = Path(a.work) / f"result-{name}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure",
        kind,
        *(["--llama-cpp", a.llama_cpp] if a.llama_cpp else []),
        "--model",
        str(model),
        "--prompt-lens",
        a.prompt_lens,
        "--decode",
        str(a.decode),
        "--threads",
        str(a.threads),
        "--vocab",
        str(vocab),
        "--result",
        str(out),
    ]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    return {**json.loads(out.read_text()), "kind": name}


METRICS = [
    ("decode ms/token (p50)", "decode_ms_p50", "lower"),
    ("decode ms/token (p95)", "decode_ms_p95", "lower"),
    ("peak RSS MiB", "peak_rss_mb", "lower"),
    ("load (session/model) s", "load_s", "lower"),
]
LABELS = {
    "ours": "rwkv-opt cpu-fp32",
    "theirs": "official fp32",
    "llama-f32": "llama.cpp f32",
    "ours-int8": "rwkv-opt cpu-int8",
    "llama-q8_0": "llama.cpp q8_0",
    "ours-int4": "rwkv-opt cpu-int4",
    "llama-q4_0": "llama.cpp q4_0",
}
# issue 19's goals: (ours, peer, at most ours/peer) for decode ms/token; ours/peer at least PREFILL_GOAL for
# prefill tok/s at every prompt length and bit width; fp32 decode at most FLOOR_GOAL x the bandwidth floor
DECODE_GOALS = (("ours", "theirs", 0.8), ("ours", "llama-f32", 0.85), ("ours-int8", "llama-q8_0", 0.8))
DECODE_GOALS += (("ours-int4", "llama-q4_0", 0.8),)
# ours -> (its llama.cpp peer, the decode goal against it)
LLAMA_GOAL = {o: (p, lim) for o, p, lim in DECODE_GOALS if p.startswith("llama-")}
# the runner timing each of our artifacts' weight GEMMs alone (_matmuls_session); "matmuls" is the fp32 one
MATMULS = {"ours": "matmuls", "ours-int8": "matmuls-int8", "ours-int4": "matmuls-int4"}
PREFILL_PAIRS = (("ours", "theirs"), ("ours", "llama-f32"), ("ours-int8", "llama-q8_0"), ("ours-int4", "llama-q4_0"))
PREFILL_GOAL = 1.5
FLOOR_GOAL = 1.2


def _metrics(prompt_lens: list[int]) -> list[tuple[str, str, str]]:
    pre = [(f"prefill tok/s, T={T}", f"prefill_tok_s_{T}", "higher") for T in prompt_lens]
    return METRICS[:2] + pre + METRICS[2:]


def summarize(results: list[dict], prompt_lens: list[int]) -> dict:
    """(runner, metric) -> (median over rounds, best round: least disturbed by load), for what each measured."""
    out = {}
    for kind in dict.fromkeys(r["kind"] for r in results if not r["kind"].startswith("matmuls")):
        rs = [r for r in results if r["kind"] == kind]
        for _, key, better in _metrics(prompt_lens):
            vals = [r[key] for r in rs if key in r]
            if vals:
                out[kind, key] = (statistics.median(vals), min(vals) if better == "lower" else max(vals))
    return out


def _goal(summ: dict, what: str, ours: str, peer: str, key: str, op: str, limit: float) -> dict:
    """One ratio row: ours / peer of `key` (medians and best rounds) against `op limit`; None when not measured."""
    row = {"ratio": f"{what}: {LABELS[ours]} / {LABELS[peer]}", "goal": f"{op} {limit:g}x"}
    if (ours, key) not in summ or (peer, key) not in summ:
        return {**row, "median": None, "best": None, "holds": None}
    (om, ob), (pm, pb) = summ[ours, key], summ[peer, key]
    med = om / pm
    return {**row, "median": med, "best": ob / pb, "holds": med <= limit if op == "<=" else med >= limit}


def goal_rows(summ: dict, prompt_lens: list[int], floor: float) -> list[dict]:
    """The issue's goals, each with its ratio (medians over rounds, and best rounds) and whether it holds."""
    rows = [_goal(summ, "decode", o, p, "decode_ms_p50", "<=", lim) for o, p, lim in DECODE_GOALS]
    om, ob = summ["ours", "decode_ms_p50"]
    rows.append(
        {
            "ratio": f"decode: {LABELS['ours']} / bandwidth floor ({floor:.2f} ms)",
            "goal": f"<= {FLOOR_GOAL:g}x",
            "median": om / floor,
            "best": ob / floor,
            "holds": om / floor <= FLOOR_GOAL,
        }
    )
    for T in prompt_lens:
        rows += [
            _goal(summ, f"prefill T={T}", o, p, f"prefill_tok_s_{T}", ">=", PREFILL_GOAL) for o, p in PREFILL_PAIRS
        ]
    return rows


def _goal_lines(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "Goals of issue 19 (decode: ratio of ms/token, lower is better; prefill: ratio of tok/s, higher is better):",
        "",
        "| ratio | goal | median ratio | best-round ratio | holds (medians) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["median"] is None:
            lines.append(f"| {r['ratio']} | {r['goal']} | n/a | n/a | not measured in this run |")
        else:
            verdict = "yes" if r["holds"] else "**no**"
            lines.append(f"| {r['ratio']} | {r['goal']} | {r['median']:.2f} | {r['best']:.2f} | {verdict} |")
    return lines


def _fmt(v: float) -> str:
    return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"


def _llama_lines(results: list[dict]) -> list[str]:
    ll = [r for r in results if r["kind"].startswith("llama-")]
    if not ll:
        return ["- llama.cpp: no build found (--llama-cpp DIR, $LLAMA_CPP_DIR, or llama-bench on PATH): not measured"]
    models = "; ".join(dict.fromkeys(f"{r['kind']}: {r['llama_model']}" for r in ll))
    return [
        f"- llama.cpp: build {ll[0]['llama_build']} (llama-bench -o json, {ll[0].get('decode_tokens')} generated "
        f"tokens, {PREFILL_REPS} repetitions after its warm-up); its CPU: {ll[0]['llama_cpu']}; GGUFs: {models}"
    ]


def _title(kinds: set[str], rwkv_version: str, preset: str) -> str:
    """The report's title: the runners that were measured."""
    ours = ", ".join(LABELS[k].removeprefix("rwkv-opt ") for k in RUNNERS if k in kinds and k.startswith("ours"))
    llama = ", ".join(k.removeprefix("llama-") for k in RUNNERS if k in kinds and k.startswith("llama-"))
    peers = f"official rwkv {rwkv_version} ('cpu fp32')" + (f" and llama.cpp ({llama})" if llama else "")
    return f"# Peers: rwkv-opt {ours} vs {peers}, {preset} synthetic"


def _header(a, results: list[dict], manifest: dict) -> list[str]:
    loads = [r[k] for r in results for k in ("load_1m_start", "load_1m_end")]
    cores = os.cpu_count()
    vers = {p: metadata.version(p) for p in ("rwkv-opt", "onnxruntime", "numpy", "torch", "rwkv")}
    # the runners' own threads (--threads each, one runner at a time) put ~a.threads on the 1-min load;
    # more than that means other work shared the CPU
    busy = max(loads) >= a.threads + 0.5 * cores
    quant = any(r["kind"] in ("ours-int8", "ours-int4") for r in results)
    return [
        _title({r["kind"] for r in results}, vers["rwkv"], a.preset),
        "",
        f"- machine: {a.machine}",
        f"- date: {a.date}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + f", python {platform.python_version()}",
        *_llama_lines(results),
        f"- command: `{a.command}`",
        f"- our artifacts: cpu-fp32 (passes {[p['name'] for p in manifest['passes']]})"
        + ("; cpu-int8 and cpu-int4 built --no-verify --quant-algorithm rtn" if quant else "")
        + f"; {a.threads} threads each (ORT intra-op / torch.set_num_threads / llama-bench -t)",
        f"- {a.runs} rounds, the runners in turn (order reversed each round), each in a fresh process; "
        f"decode = p50/p95 of {a.decode} steps after a {DECODE_PROMPT}-token prompt; prefill = median of "
        f"{PREFILL_REPS} calls after a warm-up",
        f"- load average (1 min) around the runs: {min(loads):.2f} to {max(loads):.2f} on {cores} cores, "
        f"including the runners' own {a.threads} threads"
        + (
            " -- HIGH: other work shared the CPU. Absolute times are pessimistic and the medians are noisy; "
            "the best round of each runner is the least disturbed figure"
            if busy
            else " (quiet)"
        ),
    ]


def _matmuls_lines(results: list[dict], floor: float, summ: dict) -> list[str]:
    """What our graph costs beyond its weight GEMMs, per bit width, and whether the GEMMs alone could meet
    the decode goal against that bit width's peer (if they alone take longer than goal x the peer's whole
    step, no graph over these kernels meets it)."""
    rows = []
    for ours, peer, goal in DECODE_GOALS:
        mm = [r for r in results if r["kind"] == MATMULS[ours]]
        if not mm or (ours, "decode_ms_p50") not in summ:
            continue
        med, ours_ms = statistics.median(r["decode_ms_p50"] for r in mm), summ[ours, "decode_ms_p50"][0]
        peer_ms = summ[peer, "decode_ms_p50"][0] if (peer, "decode_ms_p50") in summ else None
        vs = f"{med / peer_ms:.2f}x" if peer_ms else "n/a"
        within = "n/a" if peer_ms is None else ("yes" if med <= goal * peer_ms else "**no**")
        rows.append(
            f"| {LABELS[ours]} | {mm[0]['weight_mib']:,.1f} | {ours_ms:.2f} | {med:.2f} | "
            f"{ours_ms - med:.2f} ({(ours_ms - med) / ours_ms:.0%}) | "
            f"{LABELS[peer]} {_fmt(peer_ms) if peer_ms else '-'} | {vs} | {goal:g}x | {within} |"
        )
    pre = _prefill_gemm_rows(results, summ)
    if not rows and not pre:
        return []
    fp32 = [r for r in results if r["kind"] == "matmuls"]
    floor_note = (
        f" The fp32 GEMMs alone are {statistics.median(r['decode_ms_p50'] for r in fp32) / floor:.2f}x the "
        f"bandwidth floor ({floor:.1f} ms)."
        if fp32
        else ""
    )
    return [
        "",
        "Our weight GEMMs alone (the `matmuls` rows: every MatMul over a 2-D weight, DynamicQuantizeMatMul and "
        "MatMulNBits of the artifact, as our Session runs them -- a 4-bit artifact's block GEMMs on their int8 "
        "twins -- each fed a (1, K) input in one ORT graph, same threads, a fresh process per round; medians):",
        "",
        "| artifact | weights MiB | our step ms | GEMMs alone ms | rest of our graph ms | peer's whole step ms "
        "| GEMMs alone / peer | decode goal | GEMMs alone within it |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Where the GEMMs alone take longer than the goal allows our whole step, no graph over ORT's kernels meets "
        "that goal on this CPU: it needs faster kernels, not fewer nodes." + floor_note,
        *pre,
    ]


def _prefill_gemm_rows(results: list[dict], summ: dict) -> list[str]:
    """Per prompt length and bit width: a prompt's weight GEMMs alone (M = T; the head at M = 1) against the time
    the prefill goal allows our whole call (the peer's call / PREFILL_GOAL), and what that leaves the rest."""
    rows = []
    for ours, peer in PREFILL_PAIRS:
        mm = [r for r in results if r["kind"] == MATMULS[ours]]
        for T in sorted({int(k.rsplit("_", 1)[1]) for r in mm for k in r if k.startswith("prefill_gemm_ms_")}):
            key = f"prefill_tok_s_{T}"
            if (ours, key) not in summ or (peer, key) not in summ:
                continue
            gemm = statistics.median(r[f"prefill_gemm_ms_{T}"] for r in mm if f"prefill_gemm_ms_{T}" in r)
            ours_ms, peer_ms = 1e3 * T / summ[ours, key][0], 1e3 * T / summ[peer, key][0]
            allowed = peer_ms / PREFILL_GOAL
            rows.append(
                f"| {T} | {LABELS[ours]} | {ours_ms:,.1f} | {gemm:,.1f} | {ours_ms - gemm:,.1f} | {LABELS[peer]} "
                f"{peer_ms:,.1f} | {allowed:,.1f} | {allowed - gemm:,.1f} |"
            )
    if not rows:
        return []
    return [
        "",
        f"A prompt's weight GEMMs alone (the same graphs at M = T, the head at M = 1 as our graph runs it; all "
        f"layers at M = T, where our graph runs the last layer's FFN on two positions) against the time the "
        f"prefill goal (>= {PREFILL_GOAL:g}x the peer's tok/s) allows our whole call; medians:",
        "",
        "| T | artifact | our call ms | GEMMs alone ms | rest of our graph ms | peer's call ms | goal allows ms "
        "| left for the rest ms |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def _table_lines(summ: dict, lens: list[int]) -> list[str]:
    """Medians over rounds (best round in parentheses), one column per runner."""
    names = [n for n in RUNNERS if (n, "decode_ms_p50") in summ]
    lines = [
        "",
        "| metric | better is | " + " | ".join(LABELS[n] for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for label, key, better in _metrics(lens):
        cells = [f"{_fmt(summ[n, key][0])} ({_fmt(summ[n, key][1])})" if (n, key) in summ else "-" for n in names]
        lines.append(f"| {label} | {better} | " + " | ".join(cells) + " |")
    return lines + ["", "Cells: median over rounds (best round)."]


def _floor_lines(summ: dict, cfg, bw: list[dict], floor: float) -> list[str]:
    gbps = max(b["gbps"] for b in bw)
    bws = ", ".join(f"{b['gbps']:.2f}" for b in bw)
    dec = {n: summ[n, "decode_ms_p50"] for n in ("ours", "theirs", "llama-f32") if (n, "decode_ms_p50") in summ}
    vs = ", ".join(f"{LABELS[n]} {m / floor:.2f}x (best round {b / floor:.2f}x)" for n, (m, b) in dec.items())
    return [
        "",
        f"Memory-bandwidth floor: {bandwidth.weight_bytes_per_token(cfg) / 2**20:,.0f} MiB of fp32 weights "
        f"read per decoded token (all but the gathered embedding) / {gbps:.2f} GB/s, the best memory bandwidth "
        f"numpy reached (copy counted read + write, or read-only np.dot; best of {bws} GB/s measured before "
        f"and after the rounds) = **{floor:.1f} ms/token**. fp32 decode p50 vs floor: {vs}.",
    ]


def _round_lines(results: list[dict], lens: list[int]) -> list[str]:
    lines = [
        "",
        "Per-round figures:",
        "",
        "| round | runner | decode p50 ms | "
        + " | ".join(f"prefill T={T} tok/s" for T in lens)
        + " | peak RSS MiB | load 1m |",
        "|---|---|---|" + "---|" * len(lens) + "---|---|",
    ]
    rnd, seen = 0, set()
    for r in results:
        if r["kind"] in seen or not seen:  # each round runs each runner once
            rnd, seen = rnd + 1, set()
        seen.add(r["kind"])
        pre = " | ".join(_fmt(r[f"prefill_tok_s_{T}"]) if f"prefill_tok_s_{T}" in r else "-" for T in lens)
        lines.append(
            f"| {rnd} | {r['kind']} | {_fmt(r['decode_ms_p50'])} | {pre} | {_fmt(r['peak_rss_mb'])} "
            f"| {r['load_1m_start']:.2f} |"
        )
    return lines


GROUPS = (
    ("fp32", ("ours", "theirs", "llama-f32")),
    ("int8", ("ours-int8", "llama-q8_0")),
    ("int4", ("ours-int4", "llama-q4_0")),
)


def plot(path: Path, results: list[dict], summ: dict, lens: list[int]) -> bool:
    """PATH (a PNG): decode ms/token per bit width (ours split into its weight GEMMs alone and the rest of the
    graph, a tick at the goal against llama.cpp) and prefill tok/s per prompt length (a tick at the goal);
    medians, a dot at the best round. False (nothing written) when nothing was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(g, [n for n in names if (n, "decode_ms_p50") in summ]) for g, names in GROUPS]
    groups = [(g, names) for g, names in groups if names]
    if not groups:
        return False
    colors = {n: f"C{i}" for i, n in enumerate(RUNNERS)}
    fig, axes = plt.subplots(1, 1 + len(lens), figsize=(4.2 * (1 + len(lens)), 4.2), constrained_layout=True)
    panels = [("decode_ms_p50", "decode ms/token (lower is better)")]
    panels += [(f"prefill_tok_s_{T}", f"prefill T={T}, tok/s (higher is better)") for T in lens]
    for ax, (key, title) in zip(axes, panels, strict=True):
        x, ticks = 0.0, []
        for g, names in groups:
            start = x
            for n in names:
                if (n, key) not in summ:
                    x += 1
                    continue
                med, best = summ[n, key]
                mm = [r for r in results if r["kind"] == MATMULS.get(n, "") and key == "decode_ms_p50"]
                if mm:  # our decode bar: the GEMMs alone, then the rest of the graph
                    gemm = statistics.median(r["decode_ms_p50"] for r in mm)
                    ax.bar(x, min(gemm, med), color=colors[n], edgecolor="black", linewidth=0.5)
                    ax.bar(x, max(med - gemm, 0), bottom=min(gemm, med), color=colors[n], alpha=0.4, hatch="//")
                else:
                    ax.bar(x, med, color=colors[n], edgecolor="black", linewidth=0.5)
                ax.plot(x, best, "k.", ms=5)
                peer, limit = LLAMA_GOAL.get(n, (None, None))
                if peer and (peer, key) in summ:
                    goal = summ[peer, key][0] * (limit if key == "decode_ms_p50" else PREFILL_GOAL)
                    ax.plot([x - 0.45, x + 0.45], [goal, goal], color="red", lw=1.5)
                x += 1
            ticks.append(((start + x - 1) / 2, g))
            x += 0.6
        ax.set_xticks([t for t, _ in ticks], [g for _, g in ticks])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[n]) for n in RUNNERS if any(n in ns for _, ns in groups)]
    labels = [LABELS[n] for n in RUNNERS if any(n in ns for _, ns in groups)]
    handles += [
        plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="gray", hatch="//"),
        plt.Line2D([], [], color="red"),
        plt.Line2D([], [], color="black", marker=".", ls=""),
    ]
    labels += ["ours: rest of the graph (solid: GEMMs alone)", "goal vs llama.cpp", "best round"]
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def write_report(path: Path, a, results: list[dict], bw: list[dict], cfg, manifest: dict) -> str:
    lens = [int(x) for x in a.prompt_lens.split(",")]
    summ = summarize(results, lens)
    floor = bandwidth.floor_ms(cfg, max(b["gbps"] for b in bw))
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_suffix(".png")
    lines = [
        *_header(a, results, manifest),
        *(["", f"![decode and prefill per bit width]({png.name})"] if plot(png, results, summ, lens) else []),
        *_table_lines(summ, lens),
        *_goal_lines(goal_rows(summ, lens, floor)),
        *_floor_lines(summ, cfg, bw, floor),
        *_matmuls_lines(results, floor, summ),
        *_round_lines(results, lens),
    ]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    path.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": a.command,
                "machine": a.machine,
                "date": a.date,
                "manifest": manifest,
                "results": results,
                "bandwidth": bw,
                "floor_ms": floor,
            },
            indent=1,
        )
    )
    return text


def run_rounds(a, runners: dict[str, tuple[str, Path]], vocab: int) -> list[dict]:
    """a.runs rounds of every runner in turn (order reversed every other round), then the matmuls runners."""
    results = []
    for i in range(a.runs):
        for name in list(runners) if i % 2 == 0 else list(reversed(runners)):
            _log(f"round {i + 1}/{a.runs}: {name}")
            results.append(run_child(name, *runners[name], a, vocab))
            _log(f"  decode {results[-1]['decode_ms_p50']:.1f} ms, peak RSS {results[-1]['peak_rss_mb']:.0f} MiB")
        for ours, name in MATMULS.items():
            _log(f"round {i + 1}/{a.runs}: {name} ({LABELS[ours]}'s GEMMs alone)")
            results.append(run_child(name, "matmuls", runners[ours][1], a, vocab))
            _log(f"  decode {results[-1]['decode_ms_p50']:.1f} ms")
    return results


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.1b")
    ap.add_argument("--runs", type=int, default=5, help="rounds (each: every runner in a fresh process)")
    ap.add_argument("--prompt-lens", default="128,512")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/rwkv-opt-peers", help="checkpoint, artifacts, GGUFs and scratch")
    ap.add_argument("--artifact", help="an existing cpu-fp32 artifact built from the work dir's checkpoint")
    ap.add_argument("--llama-cpp", help="llama.cpp build directory (else $LLAMA_CPP_DIR, else llama-bench on PATH)")
    ap.add_argument("-o", "--output", type=Path, default=HERE.parent / "reports" / "peers.md")
    ap.add_argument("--measure", choices=["ours", "theirs", "matmuls", "llama"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the JSON beside -o")
    return ap


def run(a, argv) -> int:
    from rwkv_opt.config import ModelConfig

    if a.report_only:  # same figures, new layout: the command is the one that measured them
        d = json.loads(a.output.with_suffix(".json").read_text())
        a.command, a.runs = d["command"], sum(r["kind"] == "ours" for r in d["results"])
        a.machine, a.date = d.get("machine", "not recorded in the JSON"), d.get("date", "not recorded in the JSON")
        cfg = ModelConfig.from_dict(d["manifest"]["source"]["config"])
        print(write_report(a.output, a, d["results"], d["bandwidth"], cfg, d["manifest"]))
        return 0
    a.command = "python benchmarks/peers.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    a.machine = f"{bandwidth.cpu_description()}; {platform.platform()}"
    a.date = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    build = llamacpp.find_build(a.llama_cpp)
    a.llama_cpp = str(build.bin) if build else None  # the measuring processes use the same build
    _log(f"llama.cpp: {build.bin}" if build else "llama.cpp: no build found; its runners are left out")
    runners, manifest = prepare(a, build)
    cfg = ModelConfig.from_dict(manifest["source"]["config"])
    bw = [bandwidth.measure(512)]
    _log(f"copy bandwidth {bw[0]['gbps']:.2f} GB/s")
    results = run_rounds(a, runners, cfg.vocab)
    bw.append(bandwidth.measure(512))
    print(write_report(a.output, a, results, bw, cfg, manifest))
    return 0


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    if a.measure:
        Path(a.result).write_text(json.dumps(measure(a)))
        return 0
    try:
        return run(a, argv)
    except RwkvOptError as e:
        print(f"peers.py: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
