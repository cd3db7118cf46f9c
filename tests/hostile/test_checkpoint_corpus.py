"""Every hostile checkpoint of the corpus is refused in one sentence, within 10 s and 1 GB (issue 14).

Each case is refused twice over: in-process by ``load_weights`` (the pipeline's reader: structure,
bounds, shapes, sizes, CRC, NaN/inf), and, for a dozen of them, by the real CLI in a child process
(``build`` and ``pipeline --checkpoint``), which must exit 2 with one line, write nothing and leave
its output folder uncreated. Controls show the corpus' base files are valid, so each refusal is due
to the one thing the case changed.
"""

from __future__ import annotations

import os
import time

import ml_dtypes
import numpy as np
import pytest
from cli_run import MAX_BYTES, MAX_SECONDS, assert_refused, run_cli
from corpus import CHECKPOINTS, MICRO, WIDE, micro_parts

from rwkv_opt.checkpoint.weights import load_weights
from rwkv_opt.errors import CheckpointError


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"/proc/self/status has no {field}")


def _refusal_in_process(path) -> tuple[str, float, int]:
    """(message, seconds, peak RSS growth in bytes) of load_weights refusing ``path``."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset this process's peak RSS (VmHWM) to its current RSS
    before = _status_kb("VmRSS")
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        load_weights(path)
    seconds = time.monotonic() - start
    return str(info.value), seconds, (_status_kb("VmHWM") - before) * 1024


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_refused_in_process(tmp_path, name):
    write, words = CHECKPOINTS[name]
    path = write(tmp_path)
    assert os.path.getsize(path) < 10 * 2**20
    message, seconds, grew = _refusal_in_process(path)
    assert words in message, message
    assert path.name in message and "\n" not in message and len(message) < 500, message
    assert seconds < MAX_SECONDS and grew < MAX_BYTES, (seconds, grew, message)


@pytest.mark.parametrize(
    ("dtype", "cfg"), [(np.float32, MICRO), (np.float16, MICRO), (ml_dtypes.bfloat16, MICRO), (np.float32, WIDE)]
)
def test_corpus_base_files_load(tmp_path, dtype, cfg):
    """The control: the files the cases damage are valid, in every dtype and config the cases use."""
    w = load_weights(micro_parts(dtype, cfg).write(tmp_path / "base.pth"))
    assert w.config == cfg and w.digest.startswith("sha256:")


CLI_CASES = {  # name: the command that reads the checkpoint (each run costs ~2 s of imports)
    "shared_lists": "build",
    "memo_slot": "build",
    "deflated_pkl_bomb": "build",
    "deflated_version_bomb": "build",
    "extra_block_100000000": "build",
    "key_with_control_chars": "build",
    "vocab_0": "build",
    "vocab_2_31_stride_0": "pipeline",
    "nan_bf16": "pipeline",
    "bit_flip_weight": "pipeline",
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_refused_by_cli(tmp_path, name):
    write, words = CHECKPOINTS[name]
    source = tmp_path / "in"
    source.mkdir()
    path = write(source)
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(source))
    out = tmp_path / "out"
    if CLI_CASES[name] == "build":
        run = run_cli("build", path, "-o", out)
    else:
        run = run_cli("pipeline", "--checkpoint", path, "-o", out)
    message = assert_refused(run, words, path.name)
    assert not out.exists(), message
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(source))) == before
