"""Deterministic facts about one decode step of artifacts: nodes run, weight bytes read, and where ORT's
kernel time goes (shares within one profiled run, which a busy host skews far less than wall time).

    python benchmarks/decode_profile.py ART [ART ...] [--threads 2] [--steps 16] [--prompt 32]

Per artifact:
  nodes     nodes a T == 1 call runs: model.onnx's top level plus the branch each If takes for T == 1
            (fuse_wkv's step), recursively; with --decode-path, the decode path's (graph/decode.py);
  weights   bytes of initializers those nodes read (a Gather's table counts one row: what a token reads);
  profile   ORT profiler over --steps decode steps after a --prompt prefill (and one warm-up of both):
            exclusive kernel time per class -- big projections (MatMul/MatMulNBits/DynamicQuantizeMatMul
            with a weight of >= 768 x 768), LoRA (the other weight GEMMs), WKV (fuse_wkv's nodes),
            shape (Reshape/Slice/Concat/Shape/...), the rest (elementwise, norms) -- as ms/step and share.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx

from rwkv_opt.artifact import model_path
from rwkv_opt.bench.placement import nest, split_runs
from rwkv_opt.graph.decode import decode_graph
from rwkv_opt.onnx_util import numel

GEMM_OPS = {"MatMul", "MatMulNBits", "DynamicQuantizeMatMul", "Gemm", "FusedMatMul"}
SHAPE_OPS = {"Reshape", "Slice", "Concat", "Shape", "Squeeze", "Unsqueeze", "Identity", "Equal", "Less", "If"}
BIG = 768 * 768
_BYTES = {
    onnx.TensorProto.FLOAT: 4,
    onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT8: 1,
    onnx.TensorProto.INT64: 8,
}


def _then(node: onnx.NodeProto) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == "then_branch")


def decode_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes a T == 1 call runs: every If here is fuse_wkv's T == 1 test, whose then-branch runs."""
    out = []
    for n in graph.node:
        out.append(n)
        if n.op_type == "If":
            out += decode_nodes(_then(n))
    return out


def weight_bytes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> dict[str, int]:
    """Initializer bytes the nodes read, as {'big': .., 'lora': .., 'other': ..}; Gather tables count one row."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, int] = Counter()
    for n in nodes:
        for j, name in enumerate(n.input):
            t = inits.get(name)
            if t is None:
                continue
            size = numel(t) * _BYTES.get(t.data_type, 4)
            if n.op_type.startswith("Gather") and j == 0 and t.dims:
                size //= t.dims[0]
            kind = "other"
            if n.op_type in GEMM_OPS and j >= 1 and n.input[1] in inits:  # the weight and its scales, zero points
                kind = "big" if _weight_numel(n, inits[n.input[1]]) >= BIG else "lora"
            out[kind] += size
    return dict(out)


def _weight_numel(n: onnx.NodeProto, t: onnx.TensorProto) -> int:
    if n.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in n.attribute}
        return attrs["K"] * attrs["N"]
    return numel(t)


def _kind(op: str, name: str, big: set[str]) -> str:
    if op in GEMM_OPS and name in big:
        return "big"
    if "/wkv/" in name:
        return "wkv"
    if op in GEMM_OPS:
        return "lora"
    return "shape" if op in SHAPE_OPS else "rest"


def profile(art: Path, model: onnx.ModelProto, threads: int, steps: int, prompt: int, decode_path: bool) -> dict:
    """ms per decode step per kind (exclusive kernel time), from ORT's profiler."""
    from rwkv_opt.runtime import Session

    inits = {t.name: t for t in model.graph.initializer}
    big = {
        n.name
        for n in model.graph.node
        if n.op_type in GEMM_OPS
        and len(n.input) > 1
        and n.input[1] in inits
        and _weight_numel(n, inits[n.input[1]]) >= BIG
    }
    with tempfile.TemporaryDirectory(prefix="decode-prof-") as tmp:
        s = Session(art, threads=threads, profile=str(Path(tmp) / "p"), decode_graph=decode_path)
        rng = np.random.default_rng(0)
        toks = rng.integers(0, s.config.vocab, (1, prompt + steps))
        for _ in range(2):
            _, st = s.forward(toks[:, :prompt])
            for t in range(steps):
                _, st = s.forward(toks[:, prompt + t : prompt + t + 1], st)
        events = json.loads(Path(s.sess.end_profiling()).read_text())
    runs = split_runs(events)[1 + steps + 1 :]  # skip the warm-up round and the measured prefill
    ms: dict[str, float] = defaultdict(float)
    for e, _, excl in nest([e for r in runs for e in r]):
        name = e["name"].removesuffix("_kernel_time")
        ms[_kind(e.get("args", {}).get("op_name", "?"), name, big)] += excl / 1e3 / len(runs)
    return dict(ms)


def report(art: Path, threads: int, steps: int, prompt: int, decode_path: bool = False) -> dict:
    path = model_path(art)
    plain = onnx.load(str(path), load_external_data=False)
    model = (decode_graph(plain) if decode_path else None) or plain  # Session(decode_graph=decode_path)
    nodes = decode_nodes(model.graph)
    full = onnx.load(str(path))
    out = {
        "artifact": str(art),
        "graph": "decode path" if model is not plain else "model.onnx",
        "nodes": len(nodes),
        "ops": dict(Counter(n.op_type for n in nodes).most_common()),
        "weight_bytes": weight_bytes(full, nodes),
    }
    del full
    if steps:
        out["profile_ms"] = profile(art, model, threads, steps, prompt, decode_path)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="profiled decode steps (0: static facts only)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode-path", action="store_true", help="Session(decode_graph=True): graph/decode.py")
    a = ap.parse_args(argv)
    for art in a.artifacts:
        r = report(art, a.threads, a.steps, a.prompt, a.decode_path)
        wb = r["weight_bytes"]
        print(
            f"{art} ({r['graph']}): {r['nodes']} nodes per decode step; "
            f"weights read {sum(wb.values()) / 2**20:.1f} MiB "
            f"({', '.join(f'{k} {v / 2**20:.1f}' for k, v in sorted(wb.items()))})"
        )
        print("  ops: " + ", ".join(f"{k} {v}" for k, v in r["ops"].items()))
        if "profile_ms" in r:
            tot = sum(r["profile_ms"].values())
            print(
                f"  kernel time {tot:.2f} ms/step: "
                + ", ".join(
                    f"{k} {v:.2f} ({v / tot:.0%})" for k, v in sorted(r["profile_ms"].items(), key=lambda kv: -kv[1])
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
