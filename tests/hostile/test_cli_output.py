"""Hostile and careless OUTPUT paths (-o): never replace what rwkv-opt did not write, one run per output at
a time, dead runs' leftovers removed, signals clean up, modes follow the umask, a full or read-only disk is
one sentence. Each refusal: exit 2, one sentence, no traceback, the tree unchanged, within bounds."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_harness import ENV, REPO, built, refused, run_main, run_proc, snapshot


def _artifact_with(tmp_path, tmp_path_factory, name: str = "art") -> Path:
    return Path(shutil.copytree(built(tmp_path_factory, "base"), tmp_path / name))


def test_user_file_beside_an_rwkv_opt_manifest_is_not_deleted(tmp_path, tmp_path_factory):
    art = _artifact_with(tmp_path, tmp_path_factory)
    (art / "notes.txt").write_text("my notes")
    refused(lambda: run_main("build", "-o", art), "notes.txt", "rwkv-opt did not write", tree=tmp_path)


def test_foreign_manifest_json_is_not_an_artifact(tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    (web / "manifest.json").write_text(json.dumps({"name": "my-pwa", "start_url": "/"}))
    (web / "index.html").write_text("<html></html>")
    refused(lambda: run_main("build", "-o", web), "not an rwkv-opt artifact", tree=tmp_path)


def test_pipeline_also_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "manifest.json").write_text('{"tool": "webpack"}')
    refused(
        lambda: run_main("pipeline", "--no-verify", "-o", tmp_path / "proj"), "not an rwkv-opt artifact", tree=tmp_path
    )


def test_manifest_that_is_not_json_makes_the_directory_foreign(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "manifest.json").write_bytes(b"\xff\xfe not json")
    (d / "model.onnx").write_bytes(b"mine")
    refused(lambda: run_main("build", "-o", d), "not an rwkv-opt artifact", tree=tmp_path)


def test_subdirectory_inside_an_artifact_is_not_deleted(tmp_path, tmp_path_factory):
    art = _artifact_with(tmp_path, tmp_path_factory)
    (art / "data").mkdir()
    (art / "data" / "train.jsonl").write_text("{}\n")
    refused(lambda: run_main("build", "-o", art), "holds data,", tree=tmp_path)


def test_symlink_named_like_an_artifact_file_is_refused(tmp_path, tmp_path_factory):
    art = _artifact_with(tmp_path, tmp_path_factory)
    (tmp_path / "precious.bin").write_bytes(b"user data")
    (art / "model.onnx.data").symlink_to(tmp_path / "precious.bin")
    refused(lambda: run_main("build", "-o", art), "model.onnx.data", tree=tmp_path)
    assert (tmp_path / "precious.bin").read_bytes() == b"user data"


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("a file")
    refused(lambda: run_main("build", "-o", tmp_path / "out"), "is not a directory", tree=tmp_path)


@pytest.mark.parametrize("target", [".", ".."])
def test_dot_inside_a_project_never_wipes_it(tmp_path, target):
    proj = tmp_path / "site"
    (proj / "src").mkdir(parents=True)
    (proj / "manifest.json").write_text('{"tool": "rwkv-opt"}')  # even a manifest that claims to be ours
    (proj / "src" / "app.js").write_text("console.log(1)")
    refused(lambda: run_proc("build", "-o", target, cwd=proj), "current directory", tree=tmp_path)


def test_train_refuses_a_foreign_output_before_training(tmp_path, tmp_path_factory):
    art = built(tmp_path_factory, "reinforce")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello", "reward": 1.0}\n')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("\\documentclass{article}")
    refused(
        lambda: run_main("train", art, "--data", data, "--steps", "1", "-o", tmp_path / "out"),
        "not an rwkv-opt artifact",
        tree=tmp_path,
    )


def test_an_rwkv_opt_artifact_is_replaced_and_sealed(tmp_path, tmp_path_factory):
    """The control: a directory holding only rwkv-opt's files is replaced; the new manifest records the sha256
    of every file and `inspect --verify` passes."""
    art = _artifact_with(tmp_path, tmp_path_factory)
    (art / "model.onnx").write_bytes(b"an old, broken model")
    rc, _out, err = run_main("build", "--external-data", "-o", art)
    assert rc == 0, err
    files = json.loads((art / "manifest.json").read_text())["files"]
    assert sorted(files) == ["model.onnx", "model.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no staging dir, no lock file left
    rc, out, err = run_main("inspect", "--verify", art)
    assert rc == 0 and "2 files match the sha256" in out, err


def test_a_second_run_into_the_same_output_refuses(tmp_path):
    """Two real runs: a pipeline holds .out.lock while it builds; a second run into the same -o refuses in
    one sentence and the first completes."""
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "rwkv_opt.cli", "pipeline", "--no-verify", "-o", str(out)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    lock = tmp_path / ".out.lock"
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, "the first run ended before the second could start"
    refused(lambda: run_main("build", "-o", out), "another rwkv-opt run", f"pid {first.pid}", seconds=10)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "model.onnx").is_file()


def test_lock_held_by_another_process_refuses(tmp_path):
    out = tmp_path / "out"
    fd = os.open(tmp_path / ".out.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        refused(lambda: run_main("build", "-o", out), "pid 4242", tree=tmp_path, seconds=10)
    finally:
        os.close(fd)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staging_dirs_of_dead_runs_are_removed(tmp_path):
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    for name in (f".out.tmp-{dead}-abc", f".out.old-{dead}", f".out.tmp-{live.pid}-keep", f".other.tmp-{dead}-x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"half written")
    rc, _out, err = run_main("build", "-o", tmp_path / "out")
    assert rc == 0, err
    # the dead run's dirs are gone; a live process's dir and another output's dir are left alone
    live.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{dead}-x", f".out.tmp-{live.pid}-keep", "out"]


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_modes_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        rc, _out, err = run_main("build", "--external-data", "-o", tmp_path / "out")
    finally:
        os.umask(old)
    assert rc == 0, err
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == dir_mode
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == dict.fromkeys(["manifest.json", "model.onnx", "model.onnx.data"], file_mode)


def _pipeline_signalled_at(out: Path, when: str, sig: int) -> subprocess.Popen:
    """`rwkv-opt pipeline -o OUT`, sent `sig` when its stderr reaches the stage line starting with `when`."""
    p = subprocess.Popen(
        [sys.executable, "-m", "rwkv_opt.cli", "pipeline", "-o", str(out)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in p.stderr:
        if line.startswith(when):
            p.send_signal(sig)
            break
    return p


@pytest.mark.parametrize("sig,when", [(signal.SIGTERM, "[4/4] verify"), (signal.SIGHUP, "[2/4] passes")])
def test_signal_during_a_run_leaves_nothing(tmp_path, sig, when):
    """SIGTERM while verify runs its temporary session, SIGHUP during the passes: no .tmp-* dir, scratch
    weights or lock file stays, exit 130."""
    p = _pipeline_signalled_at(tmp_path / "out", when, sig)
    assert p.wait(timeout=120) == 130, "the run ended before the signal"
    assert "Traceback" not in p.stderr.read()
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leftovers_are_removed_by_the_next_run(tmp_path):
    """SIGKILL during verify cannot be caught: the staging dir (with its model) and the lock file stay; the
    next run into the same -o takes the dead run's lock and removes its staging dir."""
    p = _pipeline_signalled_at(tmp_path / "out", "[4/4] verify", signal.SIGKILL)
    p.wait(timeout=120)
    left = sorted(q.name for q in tmp_path.iterdir())
    assert left[0] == ".out.lock" and left[1].startswith(f".out.tmp-{p.pid}-") and len(left) == 2, left
    rc, _out, err = run_main("build", "-o", tmp_path / "out")
    assert rc == 0, err
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out"]


def _in_mount(tmp_path, setup: str, *args) -> tuple[int, str, str]:
    """Run the CLI in a private mount namespace after `setup` (shell) mounted something on tmp_path/mnt;
    stdout ends with "LEFT:" and what the mount holds afterwards."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare -rm (user + mount namespaces) to mount a small or read-only file system")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli = shlex.join([sys.executable, "-m", "rwkv_opt.cli", *map(str, args)])
    script = f"{setup} && {{ {cli}; rc=$?; echo LEFT:$(ls -A {shlex.quote(str(mnt))}); exit $rc; }}"
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )
    return r.returncode, r.stdout, r.stderr


def test_disk_full_is_one_sentence_and_leaves_nothing(tmp_path):
    """A 1 MiB file system under a 2.8 MB model: ENOSPC mid-write; nothing stays on it."""
    mnt = tmp_path / "mnt"
    result = []
    refused(
        lambda: (
            result.append(_in_mount(tmp_path, f"mount -t tmpfs -o size=1m tmpfs {mnt}", "build", "-o", mnt / "out"))
            or result[0]
        ),
        "cannot write",
        "the disk is full",
    )
    assert result[0][1].strip().endswith("LEFT:"), result[0][1]


def test_read_only_output_is_one_sentence(tmp_path):
    mnt = tmp_path / "mnt"
    (tmp_path / "ro").mkdir()
    refused(
        lambda: _in_mount(
            tmp_path,
            f"mount --bind {tmp_path / 'ro'} {mnt} && mount -o remount,bind,ro {mnt}",
            "build",
            "-o",
            mnt / "out",
        ),
        "read-only",
        tree=tmp_path / "ro",
    )


def test_baseline_on_a_read_only_disk_is_one_sentence(tmp_path, tmp_path_factory):
    mnt, art = tmp_path / "mnt", built(tmp_path_factory, "base")
    (tmp_path / "ro").mkdir()
    refused(
        lambda: _in_mount(
            tmp_path,
            f"mount --bind {tmp_path / 'ro'} {mnt} && mount -o remount,bind,ro {mnt}",
            "check",
            "--write-baseline",
            mnt / "b.json",
            art,
        ),
        "cannot write",
        "read-only",
        tree=tmp_path / "ro",
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_permission_denied_output_is_one_sentence(tmp_path):
    (tmp_path / "locked").mkdir(mode=0o555)
    refused(lambda: run_main("build", "-o", tmp_path / "locked" / "out"), "permission denied", tree=tmp_path)


def test_refusals_leave_no_lock_file(tmp_path, tmp_path_factory):
    art = _artifact_with(tmp_path, tmp_path_factory)
    (art / "x.txt").write_text("x")
    before = snapshot(tmp_path)
    refused(lambda: run_main("build", "-o", art), "x.txt")
    assert snapshot(tmp_path) == before and not (tmp_path / ".art.lock").exists()
