"""Benchmarks and accuracy of artifacts per execution provider, as pandas rows; regression checks.

    import rwkv_opt.bench as bench
    df = bench.run(["build/cpu-fp32"], providers=("cpu",), batches=(1, 4), prompt_lens=(128, 512))
    bench.write_report(df, "reports/bench")          # bench.csv, bench.md, bench.html, PNG plots

The column schema is fixed and documented in rwkv_opt.bench.report (SCHEMA). Attributes are
loaded lazily so that `rwkv_opt.bench.accuracy` (used by the pipeline) does not pull in pandas.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "run": "runner",
    "write_report": "report",
    "SCHEMA": "report",
    "COLUMNS": "report",
    "write_baseline": "regression",
    "check_baseline": "regression",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
