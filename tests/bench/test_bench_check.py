"""`rwkv-opt check`: the CI gate against the committed tiny baseline (exit 0), a damaged artifact
(exit 1), bad input (exit 2, one clear sentence), and --write-baseline round trips."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rwkv_opt.cli import main as cli_main

TINY_BASELINE = Path(__file__).resolve().parents[2] / "reports" / "baselines" / "tiny.json"


def check(*args):
    return subprocess.run(
        [sys.executable, "-m", "rwkv_opt.cli", "check", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_ci_gate_committed_baseline(tiny_dir):
    r = check("--baseline", TINY_BASELINE, tiny_dir / "cpu-fp32", tiny_dir / "base", tiny_dir / "cuda-fp16")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no regression" in r.stdout


def test_damaged_artifact_regresses(damaged):
    r = check("--baseline", TINY_BASELINE, damaged)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "REGRESSION" in r.stdout and "max_rel_err" in r.stdout


def test_cuda_target_needs_cpu_provider_named(tiny_dir, tmp_path, capsys):
    assert cli_main(["check", "--write-baseline", str(tmp_path / "b.json"), str(tiny_dir / "cuda-fp16")]) == 2
    assert "'cuda' is not available" in capsys.readouterr().err and not (tmp_path / "b.json").exists()


def test_write_then_check(tiny_dir, tmp_path, capsys):
    b = tmp_path / "sub" / "b.json"
    assert cli_main(["check", "--write-baseline", str(b), str(tiny_dir / "cpu-fp32")]) == 0
    doc = json.loads(b.read_text())
    assert list(doc["artifacts"]) == ["cpu-fp32"] and not list(b.parent.glob("*.tmp"))
    assert cli_main(["check", "--baseline", str(b), str(tiny_dir / "cpu-fp32")]) == 0
    assert "nothing moved" in capsys.readouterr().out


def _baseline_variant(tmp_path, edit):
    doc = json.loads(TINY_BASELINE.read_text())
    edit(doc)
    p = tmp_path / "b.json"
    p.write_text(json.dumps(doc))
    return p


def _set_tol(doc):
    doc["artifacts"]["cpu-fp32"]["tolerances"]["top1"] = {"better": "sideways", "rel": 0, "abs": 0}


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda tmp: tmp / "missing.json", "does not exist"),
        (lambda tmp: (tmp / "b.json").write_text("{not json") and tmp / "b.json", "is not valid JSON"),
        (lambda tmp: _baseline_variant(tmp, lambda d: d.update(schema="other/9")), "has schema 'other/9'"),
        (
            lambda tmp: _baseline_variant(tmp, lambda d: d["artifacts"]["cpu-fp32"]["metrics"].pop("top1")),
            "no finite number for metric 'top1'",
        ),
        (lambda tmp: _baseline_variant(tmp, _set_tol), "no valid tolerance for 'top1'"),
        (lambda tmp: _baseline_variant(tmp, lambda d: d["artifacts"].pop("cpu-fp32")), "is not in baseline"),
        (
            lambda tmp: _baseline_variant(tmp, lambda d: d["artifacts"]["cpu-fp32"].update(source="sha256:00")),
            "compare artifacts of the same checkpoint",
        ),
    ],
)
def test_bad_input_exit_2(tiny_dir, tmp_path, capsys, make, msg):
    rc = cli_main(["check", "--baseline", str(make(tmp_path)), str(tiny_dir / "cpu-fp32")])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err
    assert err.count("\n") == 1 and "Traceback" not in err  # one sentence


def test_relative_checkpoint_source_found_beside_artifact(tiny_dir, tmp_path, monkeypatch):
    import shutil

    from rwkv_opt.bench.source import artifact_info, source_path
    from rwkv_opt.errors import RwkvOptError

    art = tmp_path / "arts" / "a"
    shutil.copytree(tiny_dir / "cpu-fp32", art)
    man = json.loads((art / "manifest.json").read_text())
    man["source"]["path"] = "ck.pth"
    (art / "manifest.json").write_text(json.dumps(man))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RwkvOptError, match="pass --checkpoint"):
        source_path(artifact_info(art))
    (art.parent / "ck.pth").write_bytes(b"")
    assert source_path(artifact_info(art)) == art.parent / "ck.pth"
