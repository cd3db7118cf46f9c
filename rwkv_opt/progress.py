"""Progress lines with an ETA for long phases, and the process's memory figures.

    with phase("build", total=n_layer, unit="layers"):   # prints nothing for a phase under ~10 s
        for i in ...:
            tick(i + 1)                                   # "  build 12/24 layers  31 s, ETA 31 s"

Library code calls tick() without knowing who listens: the pipeline installs a sink (set_sink),
tests and library users get silence. Lines go out at most every `EVERY` seconds, the first after
`EVERY` seconds, so only phases that take longer than that say anything.
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from typing import Callable

EVERY = 10.0
_sink: list[Callable[[str], None]] = []
_phases: list["_Phase"] = []


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def set_sink(emit: Callable[[str], None] | None = _stderr):
    """Send progress lines to `emit` (stderr by default) inside the block."""
    _sink.append(emit or (lambda _m: None))
    try:
        yield
    finally:
        _sink.pop()


class _Phase:
    def __init__(self, name: str, total: int, unit: str):
        self.name, self.total, self.unit = name, total, unit
        self.t0 = self.last = time.perf_counter()

    def tick(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        if not _sink or now - self.last < EVERY or not self.total:
            return
        self.last = now
        took = now - self.t0
        eta = took / max(done, 1e-9) * (self.total - done)
        _sink[-1](f"      {self.name} {done}/{self.total} {self.unit}  {took:.0f} s, ETA {eta:.0f} s"
                  f"{'  ' + note if note else ''}  (RSS {rss_bytes() / 2**30:.2f} GiB)")


@contextlib.contextmanager
def phase(name: str, total: int, unit: str = "steps"):
    p = _Phase(name, total, unit)
    _phases.append(p)
    try:
        yield p
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
