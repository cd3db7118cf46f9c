"""What every hostile CLI case asserts: exit code 2, one sentence on stderr, no traceback, the directory
tree unchanged, within a time bound. Runs the real CLI: in this process (cli.main, for the cases that
need no fresh process) or as `python -m rwkv_opt.cli` (argv bytes, stdin, another cwd, signals, mounts)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's rwkv_opt from any cwd
MAX_SECONDS = 60.0
MAX_CHILD_RSS = 1 << 30  # the memory bound for refusing hostile input


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` (hidden ones too) -> (kind, size, mtime_ns, mode, link target)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = (
                p.is_symlink(),
                p.is_dir(),
                st.st_size,
                st.st_mtime_ns,
                st.st_mode,
                os.readlink(p) if p.is_symlink() else None,
            )
    return out


def run_main(*args) -> tuple[int, str, str]:
    """cli.main(args) in this process -> (exit code, stdout, stderr)."""
    from rwkv_opt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def run_proc(*args, cwd=None, stdin: bytes = b"") -> tuple[int, str, str]:
    """`python -m rwkv_opt.cli args` in a fresh process (args may be bytes) -> (exit code, stdout, stderr)."""
    cmd = [sys.executable, "-m", "rwkv_opt.cli", *(a if isinstance(a, bytes) else str(a) for a in args)]
    r = subprocess.run(cmd, cwd=cwd or REPO, env=ENV, input=stdin, capture_output=True, timeout=300)
    # the peak RSS of the largest child this process has waited for so far (KiB on Linux): an upper bound
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 < MAX_CHILD_RSS
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


def refused(run, *words, tree: Path | None = None, seconds: float = MAX_SECONDS) -> str:
    """Run `run()`; assert exit 2, one "rwkv-opt: error:" sentence (the last stderr line) holding `words`,
    no traceback, `tree` unchanged, and the time bound -> the message."""
    before = snapshot(tree) if tree is not None else None
    t0 = time.perf_counter()
    rc, _out, err = run()
    took = time.perf_counter() - t0
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    msg = err.strip().splitlines()[-1]
    assert msg.startswith("rwkv-opt: error: "), err
    body = msg[len("rwkv-opt: error: ") :]
    assert body.endswith(".") and not re.search(r"[.!?]\s+[A-Z]", body), f"not one sentence: {msg}"
    for w in words:
        assert w in msg, (w, msg)
    assert took < seconds, f"took {took:.1f}s"
    if tree is not None:
        assert snapshot(tree) == before, "the refusal changed the directory tree"
    return msg


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


_BUILT: dict[str, Path] = {}


def built(tmp_path_factory, kind: str) -> Path:
    """A tiny artifact made once per test session: "base" (`build`, target base-fp32), "external" (`build
    --external-data`), "nan" (base with NaN head weights, sealed again, as a NaN checkpoint would give) or
    "reinforce" (pipeline cpu-fp32 with the REINFORCE training head, unverified)."""
    if kind not in _BUILT:
        out = tmp_path_factory.mktemp(f"built-{kind}") / kind
        if kind in ("base", "external"):
            rc, _o, err = run_main("build", "-o", out, *(["--external-data"] if kind == "external" else []))
            assert rc == 0, err
        elif kind == "nan":
            _nan_head(copy_artifact(built(tmp_path_factory, "base"), out))
        elif kind == "reinforce":
            from rwkv_opt.checkpoint import load_source
            from rwkv_opt.pipeline import run_pipeline
            from rwkv_opt.targets import get_target

            run_pipeline(
                get_target("cpu-fp32"),
                load_source(),
                out,
                heads=[("reinforce", {})],
                do_verify=False,
                progress=lambda _m: None,
            )
        _BUILT[kind] = out
    return _BUILT[kind]


def _nan_head(art: Path) -> None:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from rwkv_opt.outdir import seal

    m = onnx.load(str(art / "model.onnx"))
    head = max(
        (t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
        key=lambda t: int(np.prod(t.dims)) if "head" in t.name else 0,
    )
    a = numpy_helper.to_array(head).copy()
    a[0] = np.nan
    head.CopyFrom(numpy_helper.from_array(a, head.name))
    onnx.save(m, str(art / "model.onnx"))
    seal(art)
