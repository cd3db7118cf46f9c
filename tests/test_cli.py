"""The CLI as a user drives it: the main job, synth, build, inspect, and every refusal
(message, exit code, and that nothing half-written is left behind)."""

import json
import os
import pickle
import zipfile

import numpy as np
import pytest
from rwkv_testutil import cli

from rwkv_opt.checkpoint.synth import synthetic_state_dict
from rwkv_opt.checkpoint.torchzip import write_pth


def leftovers(d):
    return sorted(p.name for p in d.iterdir())


def test_main_job_default_synthetic(tmp_path):
    r = cli("pipeline", "--target", "cpu-fp32", "-o", tmp_path / "build" / "demo")
    assert r.returncode == 0, r.stderr
    art = tmp_path / "build" / "demo"
    assert (art / "model.onnx").is_file() and (art / "manifest.json").is_file()
    man = json.loads((art / "manifest.json").read_text())
    assert man["target"] == "cpu-fp32" and man["verification"]["top1"] == 1.0
    assert man["verification"]["max_rel_err"] <= 1e-4
    assert all({"name", "config", "seconds", "ops_before", "ops_after", "changed"} <= set(p) for p in man["passes"])
    assert "verified vs numpy reference" in r.stdout
    assert "[1/4]" in r.stderr  # per-stage progress
    ins = cli("inspect", art)
    assert ins.returncode == 0 and "wkv_state_0" in ins.stdout and "float32" in ins.stdout
    js = json.loads(cli("inspect", art, "--json").stdout)
    wkv = [i for i in js["inputs"] if i["name"].startswith("wkv_state")]
    assert wkv and all(i["dtype"] == "float32" for i in wkv)


def test_synth_then_build_absolute_nested(tmp_path):
    ckpt = tmp_path / "a" / "b" / "model.pth"
    r = cli("synth", "--preset", "tiny", "--deepembed", "--seed", "3", "-o", ckpt)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "x" / "y" / "art"
    r = cli("build", ckpt, "-o", out)
    assert r.returncode == 0, r.stderr
    assert (out / "model.onnx").is_file()
    assert "rwkv7a" in cli("inspect", out).stdout


def _refused(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    msg = r.stderr.strip()
    assert msg.startswith("rwkv-opt: error:") and "Traceback" not in msg
    assert len(msg.splitlines()) == 1
    for w in words:
        assert w in msg, msg


def _write_tensors(path, tensors):
    write_pth(path, tensors)
    return path


@pytest.fixture
def state_dict():
    return synthetic_state_dict("tiny", dtype="fp32").materialize()


def test_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pth"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"emb.weight": Evil()}, protocol=2))
        z.writestr("evil/version", "3\n")
    out = tmp_path / "out"
    _refused(cli("build", bad, "-o", out), "evil.pth")
    assert not marker.exists() and not out.exists()
    assert leftovers(tmp_path) == ["evil.pth"]


def test_refuses_truncated(tmp_path, state_dict):
    p = _write_tensors(tmp_path / "m.pth", state_dict)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    _refused(cli("build", p, "-o", tmp_path / "out"), "m.pth")
    assert leftovers(tmp_path) == ["m.pth"]


def test_refuses_wrong_shape(tmp_path, state_dict):
    state_dict["blocks.1.att.key.weight"] = np.zeros((128, 64), np.float32)
    p = _write_tensors(tmp_path / "m.pth", state_dict)
    _refused(cli("pipeline", "--checkpoint", p, "-o", tmp_path / "out"), "blocks.1.att.key.weight", "(128, 64)")
    assert leftovers(tmp_path) == ["m.pth"]


def test_refuses_missing_key(tmp_path, state_dict):
    del state_dict["blocks.1.ffn.x_k"]
    p = _write_tensors(tmp_path / "m.pth", state_dict)
    _refused(cli("build", p, "-o", tmp_path / "out"), "missing key 'blocks.1.ffn.x_k'")
    assert leftovers(tmp_path) == ["m.pth"]


def test_refuses_rwkv6(tmp_path):
    v6 = {
        "emb.weight": np.zeros((16, 8), np.float32),
        "blocks.0.att.time_maa_x": np.zeros((1, 1, 8), np.float32),
        "blocks.0.att.time_decay": np.zeros((8,), np.float32),
    }
    p = _write_tensors(tmp_path / "v6.pth", v6)
    _refused(cli("build", p, "-o", tmp_path / "out"), "this is an RWKV-6 checkpoint; rwkv-opt supports RWKV-7")
    assert leftovers(tmp_path) == ["v6.pth"]


def test_refuses_unknown_target_before_work(tmp_path):
    _refused(cli("pipeline", "--target", "tpu-int3", "-o", tmp_path / "out"), "tpu-int3", "cpu-fp32")
    assert leftovers(tmp_path) == []


def test_refuses_missing_file_and_non_artifact_dir(tmp_path):
    _refused(cli("build", tmp_path / "nope.pth", "-o", tmp_path / "out"), "nope.pth")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("keep")
    _refused(cli("build", "-o", tmp_path / "busy"), "not empty")
    assert (tmp_path / "busy" / "precious.txt").read_text() == "keep"


def test_unknown_preset(tmp_path):
    _refused(cli("synth", "--preset", "7b", "-o", tmp_path / "m.pth"), "7b", "tiny")
    assert leftovers(tmp_path) == []


def test_sigterm_removes_the_staging_directory(tmp_path):
    """A killed run (SIGTERM, SIGHUP) unwinds like Ctrl-C: no .tmp-* directory or scratch weights stay."""
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen(
        [sys.executable, "-m", "rwkv_opt", "pipeline", "--preset", "0.1b", "-o", str(tmp_path / "out")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*/.rwkv-opt-work-*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 130
    assert list(tmp_path.iterdir()) == []
