"""One measurement in a fresh process: `python -m rwkv_opt.bench.worker JOB.json RESULT.json`.

A fresh process per artifact and setting makes peak RSS that artifact's own (the high-water mark never
goes down), keeps one session's allocator from warming the next one, and keeps the numpy
reference's weights out of the latency figures. Jobs are plain JSON dicts:

    {"kind": "latency", "artifact", "provider", "threads", "batch", "prompt_len", "decode",
     "repeat", "seed", "profile"}               -> latency + memory (+ placement and breakdown)
    {"kind": "accuracy", "artifact", "provider", "threads", "checkpoint", "settings": [[B, T], ...],
     "drift_tokens", "seed"}                    -> one accuracy dict per setting
Expected errors (RwkvOptError) come back as {"error": message}; anything else is a crash.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

from rwkv_opt.config import Provider
from rwkv_opt.errors import RwkvOptError


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def latency_job(job: dict) -> dict:
    from rwkv_opt.bench import latency
    from rwkv_opt.bench.placement import profile_run
    from rwkv_opt.runtime import Session

    provider = Provider(job["provider"])
    out = {"rss_before_mb": latency.rss_now_mb(), "load_1m_start": latency.load_1m()}
    t0 = time.perf_counter()
    sess = Session(job["artifact"], provider, threads=job["threads"])
    out["session_s"] = time.perf_counter() - t0
    out["int8_twins"] = sess.int8_twins  # a 4-bit artifact's block GEMMs on int8 twins (graph/int8_twins.py)
    out.update(latency.measure(sess, job["batch"], job["prompt_len"], job["decode"], job["repeat"], job["seed"]))
    out["peak_rss_mb"] = latency.peak_rss_mb()
    out["gpu_mem_mb"] = latency.gpu_mem_mb(provider.value)
    out["load_1m_end"] = latency.load_1m()
    del sess
    gc.collect()
    if job.get("profile", True):
        out["profile"] = profile_run(
            Path(job["artifact"]), provider, job["threads"], job["batch"], job["prompt_len"], job["seed"]
        )
    return out


def accuracy_job(job: dict) -> dict:
    import numpy as np

    from rwkv_opt.bench.accuracy import fixed_tokens, teacher_forced_stream
    from rwkv_opt.bench.source import artifact_info, load_weights_for
    from rwkv_opt.reference import ReferenceModel
    from rwkv_opt.runtime import Session

    info = artifact_info(job["artifact"])
    ref = ReferenceModel(load_weights_for(info, job.get("checkpoint")), np.float32)
    sess = Session(job["artifact"], Provider(job["provider"]), threads=job["threads"])
    results = []
    for batch, prompt_len in job["settings"]:
        tokens = fixed_tokens(ref.cfg.vocab, batch, prompt_len + job["drift_tokens"], seed=job["seed"])
        tick = lambda s, n, b=batch, t=prompt_len: _say(f"    accuracy B={b} T={t}: {s}/{n} decode steps")  # noqa: E731
        m = teacher_forced_stream(sess, ref, tokens, prompt_len, progress=tick)
        results.append({"batch": batch, "prompt_len": prompt_len, **m})
    return {"results": results}


JOBS = {"latency": latency_job, "accuracy": accuracy_job}


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = JOBS[job["kind"]](job)
    except RwkvOptError as e:
        result = {"error": str(e)}
    Path(argv[1]).write_text(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
