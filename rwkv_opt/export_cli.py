"""`rwkv-opt export genai ARTIFACT -o DIR`: an artifact as a directory onnxruntime-genai apps load."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_export_genai(a) -> int:
    from rwkv_opt.export.genai import export_genai

    record = export_genai(a.artifact, a.output)
    print(
        f"wrote {a.output} for onnxruntime-genai (target {record['target']}, {record['provider']}; "
        f"{record['export_bytes'] / 2**20:.1f} MiB, artifact {record['artifact_bytes'] / 2**20:.1f} MiB)"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `export` with its `genai` sub-command to the rwkv-opt parser."""
    p = sub.add_parser("export", help="export an artifact for another runtime")
    kinds = p.add_subparsers(dest="export_kind", required=True, metavar="KIND", help="what to export for: genai")
    g = kinds.add_parser("genai", help="a directory that onnxruntime-genai (og.Model) runs: C#, C, C++, Java, Python")
    g.add_argument("artifact", type=Path, help="artifact directory made by `rwkv-opt pipeline` or `build`")
    g.add_argument("-o", "--output", type=Path, required=True, help="output directory (DIR)")
    g.set_defaults(func=cmd_export_genai)
