"""This machine's memory bandwidth (numpy copy and read-only), and the decode floor it implies for a model.

    python benchmarks/bandwidth.py [--mb 1024] [--repeat 5]

Copy bandwidth follows STREAM's convention: bytes read + bytes written per second, arrays far larger
than the last-level cache. It is measured with 1 thread and with one thread per core (numpy
releases the GIL while copying). Read-only bandwidth is each thread's np.dot of its own array with
itself (a streaming read of every byte once; bytes read per second), because decoding only reads
weights and ORT's GEMV reads faster than half the copy figure. The best of all is taken: the
fastest this machine was seen to move bytes. The decode floor of a model is the bytes of
weights one decoded token must read (every weight but the embedding, of which one row is gathered)
divided by that bandwidth: no runtime that streams fp32 weights from DRAM can decode faster.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np


def _time_together(work, args: list[tuple]) -> float:
    """Seconds for one thread per args tuple to run work(*args), all started together."""
    barrier = threading.Barrier(len(args) + 1)

    def run(*a):
        barrier.wait()
        work(*a)

    threads = [threading.Thread(target=run, args=a) for a in args]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def _copy_time(src: list[np.ndarray], dst: list[np.ndarray]) -> float:
    """Seconds to copy src[i] -> dst[i], one thread per pair, all started together."""
    return _time_together(lambda s, d: np.copyto(d, s), list(zip(src, dst)))


def _read_time(arrays: list[np.ndarray]) -> float:
    """Seconds for one thread per array to np.dot it with itself (reads every byte once)."""
    return _time_together(lambda a: np.dot(a, a), [(a,) for a in arrays])


def read_bandwidth(mb: int = 1024, repeat: int = 5, threads: int = 1) -> float:
    """Best-of-`repeat` read-only bandwidth in GB/s (1e9 bytes read) over `mb` MiB in all."""
    n = (mb << 20) // 4 // threads
    arrays = [np.full(n, 1.0, np.float32) for _ in range(threads)]
    best = min(_read_time(arrays) for _ in range(repeat))
    return n * 4 * threads / best / 1e9


def copy_bandwidth(mb: int = 1024, repeat: int = 5, threads: int = 1) -> float:
    """Best-of-`repeat` copy bandwidth in GB/s (1e9 bytes, read + write) over `mb` MiB per direction."""
    n = (mb << 20) // 4 // threads
    src = [np.full(n, 1.0, np.float32) for _ in range(threads)]
    dst = [np.zeros(n, np.float32) for _ in range(threads)]  # touched: no page faults in the timing
    best = min(_copy_time(src, dst) for _ in range(repeat))
    return 2 * n * 4 * threads / best / 1e9


def measure(mb: int = 1024, repeat: int = 5) -> dict:
    cores = os.cpu_count() or 1
    res = {"mb": mb, "repeat": repeat, "gbps_1thread": copy_bandwidth(mb, repeat, 1)}
    res[f"gbps_{cores}threads"] = copy_bandwidth(mb, repeat, cores) if cores > 1 else res["gbps_1thread"]
    res[f"gbps_read_{cores}threads"] = read_bandwidth(mb, repeat, cores)
    res["gbps"] = max(v for k, v in res.items() if k.startswith("gbps_"))
    return res


def cpu_description() -> str:
    """The CPU model, logical CPU count and the SIMD/matrix flags that decide ORT's kernels (for reports)."""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    name = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), [])
    keep = sorted(
        f
        for f in flags
        if f.startswith(("avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx", "avx_vnni", "avx2", "fma"))
    )
    return f"{name}, {os.cpu_count()} logical CPUs; flags: {' '.join(keep) or 'n/a'}"


def weight_bytes_per_token(config, bytes_per_weight: int = 4) -> int:
    """Bytes of weights read to decode one token: all parameters but the embedding table (gathered)."""
    gathered = config.vocab * config.n_embd
    if config.deepembed:
        gathered += config.n_layer * config.vocab * config.d_semb
    return (config.n_params() - gathered) * bytes_per_weight


def floor_ms(config, gbps: float, bytes_per_weight: int = 4) -> float:
    return weight_bytes_per_token(config, bytes_per_weight) / (gbps * 1e9) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024, help="MiB per array (default 1024)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--preset", help="also print the fp32 decode floor of this synthetic preset (e.g. 0.1b)")
    a = ap.parse_args()
    r = measure(a.mb, a.repeat)
    print(", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    if a.preset:
        from rwkv_opt.checkpoint.synth import preset_config

        cfg = preset_config(a.preset)
        print(
            f"{a.preset}: {weight_bytes_per_token(cfg) / 2**20:.0f} MiB of fp32 weights per decoded token, "
            f"floor {floor_ms(cfg, r['gbps']):.1f} ms/token at {r['gbps']:.2f} GB/s"
        )


if __name__ == "__main__":
    main()
