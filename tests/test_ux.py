"""A new user's first hour (issue 18): progress, refusals with next steps, help, verification explained,
and the small slips (generate, chat, inspect | head, README paths). Real pipelines on the tiny preset."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from rwkv_opt import __version__, progress
from rwkv_opt.cli import build_parser, main, verification_lines
from rwkv_opt.config import Provider
from rwkv_opt.runtime import available_providers
from rwkv_opt.targets import TARGETS, Budget, get_target

REPO = Path(__file__).resolve().parents[1]
STRICT = Budget(min_top1=1.0, max_rel_err=1e-9, max_kl=0.0)  # no artifact meets max|err|/std 1e-9


def cli(*args, stdin: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "rwkv_opt", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
    )


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    """A tiny cpu-fp32 artifact with the sampling head, built through the CLI, and that run's stderr (a log)."""
    art = tmp_path_factory.mktemp("ux") / "sampler"
    r = cli("pipeline", "--head", "sampling", "-o", art)
    assert r.returncode == 0, r.stderr
    return art, r.stderr


# ---- basics: --version, help, targets NAME --------------------------------------------------------------


def test_version_through_python_m():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"rwkv-opt {__version__}"


def test_every_option_says_what_it_does_and_its_default():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for a in p._actions:
            if a.help == "==SUPPRESS==" or a.dest == "help":
                continue
            assert a.help, f"{name} {a.option_strings or a.dest} has no help text"
    text = sub.choices["pipeline"].format_help()
    assert "(default: cpu-fp32)" in text and "cpu-int4" in text and "{auto,gptq,rtn}" in text
    assert "(default: auto)" in text and "--keep-unverified" in text
    assert "(default: bf16)" in sub.choices["synth"].format_help()
    assert "rwkv_opt/training/data.py" not in sub.choices["train"].format_help()


def test_targets_name_shows_passes_budget_and_ops(capsys):
    assert main(["targets", "cpu-int8"]) == 0
    out = capsys.readouterr().out
    assert 'scheme="int8"' in out and 'algorithm="rtn"' in out  # the quantize pass's whole config, as it runs
    assert "1. fuse_wkv" in out and "3. quantize" in out and "CPUExecutionProvider" in out
    assert "top-1 agreement >= 98%" in out and "max|err|/std <= 0.5" in out and "33 teacher-forced" in out
    assert re.search(r"com\.microsoft ops: .*DynamicQuantizeMatMul", out) and "weights: float, int64, int8" in out
    assert main(["targets", "nope"]) == 2 and "unknown target 'nope'" in capsys.readouterr().err


# ---- progress: bars on a terminal, lines in logs, -q ---------------------------------------------------------


def test_progress_lines_with_elapsed_time_without_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "EVERY", 0.0)
    lines: list[str] = []
    with progress.set_sink(lines.append), progress.phase("quantize", 3, "matrices"):
        for k in range(3):
            progress.tick(k + 1)
    assert lines[0].strip().startswith("quantize 1/3 matrices") and "ETA" in lines[0]
    assert lines[-1].strip().startswith("quantize: 3 matrices in") and not any("\r" in x for x in lines)


def test_progress_bar_with_eta_on_a_terminal(monkeypatch):
    master, slave = pty.openpty()
    tty = os.fdopen(slave, "w")
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setattr(progress, "BAR_AFTER", 0.0)
    monkeypatch.setattr(progress, "_REDRAW", 0.0)
    monkeypatch.setenv("TERM", "xterm")
    with progress.set_sink(), progress.phase("build", 4, "layers"):
        for i in range(4):
            progress.tick(i + 1)
    with pytest.raises(KeyboardInterrupt), progress.set_sink(), progress.phase("verify", 9, "calls"):
        progress.tick(1)
        raise KeyboardInterrupt  # an interrupted phase erases its bar and says nothing more
    tty.close()
    shown = b""
    while select.select([master], [], [], 1.0)[0]:  # everything written, however the pty splits it
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the writer closed (EIO)
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    shown = shown.decode()
    assert "\r\x1b[K      [######" in shown and "build 2/4 layers" in shown and "ETA" in shown
    assert "build: 4 layers in" in shown  # the bar is replaced by the phase's total time
    build, verify = shown.split("verify 1/9 calls")
    assert build.count("\r\x1b[K") == 6  # 4 redraws, the erase before the total line, the next bar
    assert verify.endswith("\r\x1b[K") and "verify:" not in verify


def test_pipeline_quiet(tmp_path):
    quiet = cli("pipeline", "-q", "-o", tmp_path / "q")
    assert quiet.returncode == 0 and quiet.stderr == "" and "verified" in quiet.stdout


def test_pipeline_logs_have_no_bars_and_write_after_verifying(sampler):
    _, stderr = sampler
    assert "[1/4]" in stderr and "\r" not in stderr and "\x1b[" not in stderr  # stderr is a pipe: lines only
    assert stderr.index("[4/4] verify") < stderr.index("wrote artifact")
    assert "write artifact" not in stderr.split("[4/4]")[0]


# ---- refusals and --keep-unverified ---------------------------------------------------------------------------


def test_refusal_says_what_was_missed_why_and_what_next(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(TARGETS, "cpu-fp32", dataclasses.replace(get_target("cpu-fp32"), budget=STRICT))
    assert main(["pipeline", "-o", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    msg = err.split("rwkv-opt: error: ")[1]
    assert re.search(r"max\|err\|/std \S+ > 1e-09 \(\d[\d.e+]*x\)", msg), msg  # missed, and by how much
    assert "synthetic checkpoint (random weights) has near-flat logits" in msg
    assert "--checkpoint" in msg and "--no-verify" in msg and "--keep-unverified" in msg
    assert "nothing was written" in msg and list(tmp_path.iterdir()) == []
    assert "wrote artifact" not in err and "write artifact" not in err


def test_keep_unverified_writes_a_marked_artifact(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(TARGETS, "cpu-fp32", dataclasses.replace(get_target("cpu-fp32"), budget=STRICT))
    art = tmp_path / "art"
    assert main(["pipeline", "--keep-unverified", "-o", str(art)]) == 0
    out = capsys.readouterr()
    v = json.loads((art / "manifest.json").read_text())["verification"]
    assert v["status"] == "failed" and not v["within_budget"] and v["misses"] and "kept" in v
    assert "FAILED verification" in out.out and "WARNING" in out.err
    assert main(["inspect", str(art)]) == 0
    assert "FAILED: missed its accuracy budget" in capsys.readouterr().out
    assert main(["pipeline", "--keep-unverified", "--no-verify", "-o", str(tmp_path / "b")]) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_verification_explains_positions_and_the_binomial_decision(tiny7, tmp_path):
    """Tiny cpu-int4's top-1 is under its 90% rate (25-27 of 33 on the CPUs seen): the output says
    whether the binomial test accepted it, with the p-value the budget computes."""
    from rwkv_opt.pipeline import run_pipeline

    t = get_target("cpu-int4")
    v = run_pipeline(t, tiny7, tmp_path / "a", progress=lambda _m: None, keep_unverified=True)["verification"]
    hits = round(v["top1"] * v["positions"])
    assert v["positions"] == 33 and "16 + 32 tokens" in v["protocol"] and hits < 33
    text = "\n".join(verification_lines(t, v))
    p = t.budget.top1_p_value(hits, 33)
    verdict = "accepts" if p >= 0.05 else "refuses"
    assert (
        f"top-1 {hits}/33 is under the 90% budget rate; the one-sided binomial test {verdict} it: p = {p:.3f}" in text
    ), text
    assert "checked: 33 teacher-forced positions" in text


# ---- slips ----------------------------------------------------------------------------------------------------


def test_sampling_head_verifies_without_ort_warnings(sampler):
    _, stderr = sampler
    assert "appears in graph inputs" not in stderr and "[4/4] verify" in stderr


def test_generate_counts_tokens_and_says_the_model_is_synthetic(sampler):
    art, _ = sampler
    r = cli("generate", art, "--prompt", "Hello", "--max-tokens", "12", "--seed", "1")
    assert r.returncode == 0, r.stderr
    n = int(re.search(r"\[(\d+) tokens in ", r.stderr).group(1))
    assert 1 <= n <= 12 and "pieces" not in r.stderr
    assert "synthetic checkpoint (random weights)" in r.stderr


@pytest.mark.skipif(Provider.CUDA in available_providers(), reason="this onnxruntime has the CUDA EP")
def test_generate_on_a_missing_provider_names_its_own_option(sampler):
    r = cli("generate", sampler[0], "--prompt", "Hi", "--provider", "cuda")
    assert r.returncode == 2 and "--provider cpu" in r.stderr and "--providers" not in r.stderr, r.stderr


def test_chat_help_is_not_sent_to_the_model(sampler):
    art, _ = sampler
    r = cli("chat", art, "--max-tokens", "3", "--seed", "1", stdin="/help\n/what\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("/reset clears the state") == 2 and "unknown command /what" in r.stdout
    assert "Assistant:" not in r.stdout


def test_inspect_into_a_closed_pipe_is_quiet(sampler):
    art, _ = sampler
    p = subprocess.Popen(
        [sys.executable, "-m", "rwkv_opt", "inspect", str(art)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.close()  # like `| head` that has already left
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_readme_examples_write_only_into_the_ignored_work_folder():
    text = (REPO / "README.md").read_text()
    outs = re.findall(r"(?:-o|--write-baseline|--baseline)\s+(\S+)", text)
    assert len(outs) >= 10
    for path in outs:
        assert path.startswith("work/"), f"README example writes {path} outside work/"
    ignored = subprocess.run(["git", "check-ignore", "-q", "work/cpu-fp32/model.onnx"], cwd=REPO)
    assert ignored.returncode == 0, "work/ is not gitignored"


def test_a_phase_of_unknown_length_has_a_heartbeat(monkeypatch):
    """onnxsim, an ORT session's start, the save: no amount to count, so a heartbeat says the phase is
    alive with its elapsed time (lines in logs), and its total time when it ends; nothing without a sink."""
    import time

    from rwkv_opt import progress

    monkeypatch.setattr(progress, "EVERY", 0.05)
    lines: list[str] = []
    with progress.set_sink(lines.append, bar=False):
        with progress.phase("onnxsim"):
            time.sleep(0.3)
    beats = [m for m in lines if "onnxsim ..." in m and "so far" in m]
    assert len(beats) >= 2 and lines[-1].strip().startswith("onnxsim: in ")
    n = len(lines)
    with progress.phase("quiet"):  # no sink: silence, and no thread left behind
        time.sleep(0.1)
    assert len(lines) == n
    with progress.set_sink(lines.append, bar=False):
        with progress.phase("fast"):  # ends before the first beat: says nothing
            pass
    assert len(lines) == n
