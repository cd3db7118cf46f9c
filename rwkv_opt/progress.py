"""Progress for long phases: a bar with an ETA on a terminal, lines with elapsed time otherwise;
and the process's memory figures.

    with phase("build", total=n_layer, unit="layers"):   # says nothing for a phase under ~10 s
        for i in ...:
            tick(i + 1)                                   # "  build 12/24 layers  31 s, ETA 31 s"

Library code calls tick() without knowing who listens: the pipeline installs a sink (set_sink),
tests and library users get silence. Without a terminal (CI logs) lines go out at most every
`EVERY` seconds, the first after `EVERY` seconds, and a phase that printed one ends with a line of
its total time. On a terminal (`bar=True`) the phase redraws one bar line in place instead, from
`BAR_AFTER` seconds on, and leaves its total time behind when it ends.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, TextIO

EVERY = 10.0  # seconds between progress lines (no terminal)
BAR_AFTER = 2.0  # a terminal's bar appears once a phase has run this long
BAR_WIDTH = 24
_REDRAW = 0.2  # seconds between a bar's redraws


@dataclass
class _Sink:
    emit: Callable[[str], None]
    bar: TextIO | None = None  # the terminal a bar is drawn on, or None for lines only


_sink: list[_Sink] = []
_phases: list["_Phase"] = []


def stderr_line(msg: str) -> None:
    """The default sink: one line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def is_terminal(stream: TextIO) -> bool:
    """Whether bars may be drawn on `stream`: an interactive terminal that understands carriage returns."""
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"


@contextlib.contextmanager
def set_sink(emit: Callable[[str], None] | None = stderr_line, bar: bool | None = None):
    """Send progress to `emit` inside the block (None: silence, for -q).

    bar=None draws bars when `emit` is the stderr sink and stderr is a terminal; True/False force it."""
    if bar is None:
        bar = emit is stderr_line and is_terminal(sys.stderr)
    _sink.append(_Sink(emit or (lambda _m: None), sys.stderr if bar and emit else None))
    try:
        yield
    finally:
        _sink.pop()


def _clock(seconds: float) -> str:
    """12 s, 3 min 05 s, 1 h 02 min."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class _Phase:
    def __init__(self, name: str, total: int, unit: str):
        self.name, self.total, self.unit = name, total, unit
        self.t0 = self.last = time.perf_counter()
        self.said = False  # whether anything was shown (then the end is shown too)
        self._stop: threading.Event | None = None
        self._beat: threading.Thread | None = None
        if not total and _sink:  # an amount of work nobody can count: a heartbeat with the elapsed time
            self._stop = threading.Event()
            self._beat = threading.Thread(target=self._heartbeat, args=(_sink[-1],), daemon=True)
            self._beat.start()

    def _heartbeat(self, sink: _Sink) -> None:
        while not self._stop.wait(_REDRAW if sink.bar is not None else EVERY):
            took = time.perf_counter() - self.t0
            if sink.bar is not None:
                if took >= BAR_AFTER:
                    self.said = True
                    sink.bar.write(f"\r\033[K      {self.name} ...  {_clock(took)}")
                    sink.bar.flush()
            else:
                self.said = True
                sink.emit(f"      {self.name} ...  {_clock(took)} so far  (RSS {rss_bytes() / 2**30:.2f} GiB)")

    def status(self, done: int, now: float) -> str:
        """'name 12/24 layers  31 s, ETA 31 s'."""
        took = now - self.t0
        eta = took / max(done, 1e-9) * (self.total - done) if done else float("nan")
        return f"{self.name} {done}/{self.total} {self.unit}  {_clock(took)}, ETA {_clock(eta) if eta == eta else '?'}"

    def tick(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        if not _sink or not self.total:
            return
        sink = _sink[-1]
        if sink.bar is not None:
            if now - self.t0 >= BAR_AFTER and now - self.last >= _REDRAW:
                self.last, self.said = now, True
                filled = int(BAR_WIDTH * min(done, self.total) / self.total)
                sink.bar.write(
                    f"\r\033[K      [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
                    f"{self.status(done, now)}{'  ' + note if note else ''}"
                )
                sink.bar.flush()
            return
        if now - self.last < EVERY:
            return
        self.last, self.said = now, True
        sink.emit(f"      {self.status(done, now)}{'  ' + note if note else ''}  (RSS {rss_bytes() / 2**30:.2f} GiB)")

    def end(self, completed: bool = True) -> None:
        """Replace the bar (or follow the lines) with the phase's total time, if anything was shown; an
        interrupted phase only erases its bar, so the error that follows starts on a clean line."""
        if self._stop is not None:
            self._stop.set()
            self._beat.join(timeout=1.0)
        if not _sink or not self.said:
            return
        sink = _sink[-1]
        if sink.bar is not None:
            sink.bar.write("\r\033[K")
            sink.bar.flush()
        if completed:
            amount = f"{self.total} {self.unit} " if self.total else ""
            sink.emit(f"      {self.name}: {amount}in {_clock(time.perf_counter() - self.t0)}")


@contextlib.contextmanager
def phase(name: str, total: int = 0, unit: str = "steps"):
    """A phase of `total` units of work (layers, matrices, tokens) that tick() reports on; with total 0
    (work nobody can count: onnxsim, an ORT session's start, a save) a heartbeat shows the elapsed time."""
    p = _Phase(name, total, unit)
    _phases.append(p)
    try:
        yield p
    except BaseException:
        p.end(completed=False)
        raise
    else:
        p.end()
    finally:
        _phases.remove(p)


def tick(done: int, note: str = "") -> None:
    """Report `done` of the innermost phase's total (no-op outside a phase or without a sink)."""
    if _phases:
        _phases[-1].tick(done, note)


def rss_bytes() -> int:
    """Resident set size now (anonymous and file-backed pages)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def release_freed_memory() -> None:
    """Hand memory freed inside malloc's heap back to the OS (glibc's malloc_trim): layer-sized arrays
    (4-32 MB) live in the heap, not in their own mappings, and a freed reference model would otherwise
    stay in the RSS while the next phase maps the artifact."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (what /usr/bin/time -v reports).

    VmHWM of this process's own address space: getrusage's ru_maxrss starts a forked child at its
    parent's peak, so a pipeline started from a large process would report the parent's figure."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform == "darwin" else 1024)


def available_memory() -> int:
    """Bytes this process can still use: MemAvailable, or the cgroup's limit minus its usage if lower."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = open(limit_f).read().strip()
            if limit.isdigit() and int(limit) < (1 << 60):  # the page cache counts in usage: cap only
                avail = int(limit) if avail is None else min(avail, int(limit))
            break
        except OSError:
            continue
    return avail if avail is not None else 8 << 30
