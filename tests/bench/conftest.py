"""Tiny artifacts for the bench tests: the base graph (`rwkv-opt build`), cpu-fp32 and cuda-fp16
(fp16-mixed; ORT's CPU EP runs it through fp32 casts, so its accuracy is checkable here).

cpu-fp32 is built with the target's registered passes only, so these tests keep running while a
pass the target lists is still being written (the artifact then lacks that pass, nothing else).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rwkv_opt.outdir import seal
from rwkv_opt.checkpoint import load_source
from rwkv_opt.cli import main as cli_main
from rwkv_opt.passes.base import load_builtin
from rwkv_opt.pipeline import run_pipeline
from rwkv_opt.targets import get_target

REPO = Path(__file__).resolve().parents[2]
TINY_BASELINE = REPO / "reports" / "baselines" / "tiny.json"


def buildable(name: str):
    t = get_target(name)
    return dataclasses.replace(t, passes=tuple(p for p in t.passes if p[0] in load_builtin()))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-artifacts")
    assert cli_main(["build", "-o", str(d / "base")]) == 0
    for target in ("cpu-fp32", "cuda-fp16"):
        run_pipeline(buildable(target), load_source(), d / target, progress=lambda _m: None)
    return d


@pytest.fixture(scope="session")
def damaged(tiny_dir, tmp_path_factory) -> Path:
    """cpu-fp32 with its largest non-embedding weight scaled by 1.05 (a 5% weight error), sealed again (its
    manifest's sha256s match): what a pass with a precision bug would write, not a tampered file."""
    d = tmp_path_factory.mktemp("damaged") / "cpu-fp32"
    shutil.copytree(tiny_dir / "cpu-fp32", d)
    m = onnx.load(str(d / "model.onnx"))
    floats = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and "emb" not in t.name]
    t = max(floats, key=lambda t: int(np.prod(t.dims)))
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.05), t.name))
    onnx.save(m, str(d / "model.onnx"))
    seal(d)
    return d
