"""Describe an artifact: config, I/O (names, dtypes, shapes), sizes, metadata and passes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx

from rwkv_opt.graph.contract import Key
from rwkv_opt.artifact import (
    MANIFEST_FILE,
    artifact_size,
    load_proto,
    model_config,
    model_path,
    read_manifest,
    verify_files,
)


def _shape(vi) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _dtype(vi) -> str:
    return (
        onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
        if vi.type.tensor_type.elem_type != onnx.TensorProto.BFLOAT16
        else "bfloat16"
    )


def info(artifact: Path, verify: bool = False) -> dict:
    """The artifact's facts; `verify` first checks every file against the sha256 its manifest records."""
    path = model_path(Path(artifact))
    checked = verify_files(path.parent) if verify else None
    m = load_proto(path)
    meta = {p.key: p.value for p in m.metadata_props}
    manifest = read_manifest(path.parent) if (path.parent / MANIFEST_FILE).is_file() else {}
    passes = manifest.get("passes") if isinstance(manifest.get("passes"), list) else []
    return {
        "path": str(path),
        "size_bytes": artifact_size(path.parent),
        "config": _config(path, meta),
        "inputs": [{"name": i.name, "dtype": _dtype(i), "shape": _shape(i)} for i in m.graph.input],
        "outputs": [{"name": o.name, "dtype": _dtype(o), "shape": _shape(o)} for o in m.graph.output],
        "nodes": len(m.graph.node),
        "ops": dict(Counter(n.op_type for n in m.graph.node).most_common()),
        "metadata": meta,
        "target": manifest.get("target"),
        "passes": [p["name"] for p in passes if isinstance(p, dict) and "name" in p],
        "verification": manifest.get("verification"),
        **({"files_verified": checked} if verify else {}),
    }


def _config(path: Path, meta: dict) -> dict:
    """The model's config ({} for an ONNX model without rwkv-opt metadata)."""
    return model_config(path, meta).to_dict() if Key.CONFIG in meta else {}


def describe(artifact: Path, as_json: bool = False, verify: bool = False) -> str:
    d = info(artifact, verify)
    if as_json:
        return json.dumps(d, indent=2)
    c = d["config"]
    lines = [
        f"artifact   {d['path']}  ({d['size_bytes'] / 2**20:.1f} MiB on disk)",
        f"target     {d['target']}   passes: {' -> '.join(d['passes']) or '(none)'}",
        f"model      {c.get('variant')}  n_layer={c.get('n_layer')} n_embd={c.get('n_embd')} "
        f"head_size={c.get('head_size')} vocab={c.get('vocab')}",
        f"graph      {d['nodes']} nodes; top ops: " + ", ".join(f"{k} {v}" for k, v in list(d["ops"].items())[:8]),
    ]

    def io_lines(items, kind):
        shown = items if len(items) <= 8 else items[:4] + [None] + items[-3:]
        for x in shown:
            lines.append(f"{kind:<10} ..." if x is None else f"{kind:<10} {x['name']:<16} {x['dtype']:<9} {x['shape']}")

    io_lines(d["inputs"], "input")
    io_lines(d["outputs"], "output")
    for k, v in d["metadata"].items():
        if k != Key.CONFIG:
            lines.append(f"meta       {k} = {v}")
    if d["verification"]:
        v = d["verification"]
        status = v.get("status") or ("skipped" if "skipped" in v else "passed" if v.get("within_budget") else "failed")
        label = {
            "failed": "FAILED: missed its accuracy budget, kept with --keep-unverified; do not trust it",
            "skipped": "SKIPPED: not verified",
        }.get(status, status)
        lines.append(f"verified   {label}  {json.dumps(v)}")
    if verify:
        lines.append(f"files      {d['files_verified']} files match the sha256 in {MANIFEST_FILE}")
    return "\n".join(lines)
