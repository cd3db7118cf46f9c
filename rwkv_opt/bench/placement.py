"""Where the nodes ran and where the time went, from ONNX Runtime's profiler JSON.

A profiled session runs one warm-up prefill + decode, then the measured prefill and PROFILE_STEPS
decode steps; only the measured runs count. Node events nested inside another node's event on the
same thread (a Scan's or an If's body) count once: placement and per-block time use the
outermost event, per-op-type time uses each event's exclusive time.

    placement: nodes_on_provider  fraction of distinct top-level nodes on the requested EP
               time_on_provider   fraction of top-level node time on the requested EP
               cpu_fallback       the requested EP is not CPU and either ORT dropped it from the
                                  session or less than FALLBACK_TIME_SHARE of the time ran on it
    breakdown: ms per op type and per block (`/blocks.3/...` -> block 3; others by first scope)
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

PROFILE_STEPS = 4
FALLBACK_TIME_SHARE = 0.95
_BLOCK = re.compile(r"^/blocks\.(\d+)/")
_SUFFIX = "_kernel_time"


def block_of(node_name: str) -> str:
    m = _BLOCK.match(node_name)
    if m:
        return f"blocks.{int(m[1]):03d}"
    scope = node_name.strip("/").split("/")[0]
    return scope or "(unnamed)"


def nest(events: list[dict]) -> list[tuple[dict, dict, float]]:
    """(event, its outermost enclosing node event, exclusive us) for every node event.

    A node event that starts inside another node event of the same thread is its child (a Scan's
    or an If's body); exclusive time is the event's duration minus its direct children's."""
    out, child_sum, stacks = [], {}, {}
    for e in sorted(events, key=lambda e: (e["tid"], e["ts"], -e["dur"])):
        stack = stacks.setdefault(e["tid"], [])
        while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"]:
            stack.pop()
        if stack:
            child_sum[id(stack[-1])] = child_sum.get(id(stack[-1]), 0) + e["dur"]
        out.append((e, stack[0] if stack else e))
        stack.append(e)
    return [(e, root, max(e["dur"] - child_sum.get(id(e), 0), 0)) for e, root in out]


def top_level(events: list[dict]) -> list[dict]:
    """Node events not contained in another node event of the same thread."""
    return [e for e, root, _ in nest(events) if root is e]


def split_runs(events: list[dict]) -> list[list[dict]]:
    """Node events grouped by the `model_run` they fall in, in time order."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    groups: list[list[dict]] = [[] for _ in runs]
    starts = np.array([r[0] for r in runs])
    for e in (e for e in events if e.get("cat") == "Node"):
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if 0 <= i < len(runs) and e["ts"] <= runs[i][1]:
            groups[i].append(e)
    return groups


def _name(e: dict) -> str:
    return e["name"][: -len(_SUFFIX)] if e["name"].endswith(_SUFFIX) else e["name"]


def summarize(nodes: list[dict], ort_provider: str) -> dict:
    """Placement over the top-level node events; ms per op type (exclusive time, so a Scan's or
    an If's body counts under its own ops) and per block (the outermost node's block)."""
    names, on = set(), set()
    t_all = t_on = 0.0
    ops, blocks = defaultdict(float), defaultdict(float)
    for e, root, excl in nest(nodes):
        ops[e.get("args", {}).get("op_name", "?")] += excl / 1e3
        blocks[block_of(_name(root))] += excl / 1e3
        if root is not e:
            continue
        names.add(_name(e))
        if e.get("args", {}).get("provider", "") == ort_provider:
            on.add(_name(e))
            t_on += e["dur"]
        t_all += e["dur"]
    return {
        "nodes_on_provider": len(on) / len(names) if names else float("nan"),
        "time_on_provider": t_on / t_all if t_all else float("nan"),
        "op_ms": dict(ops),
        "block_ms": dict(blocks),
    }


def parse_profile(events: list[dict], ort_provider: str, n_warm_runs: int, prefill_runs: int = 1) -> dict:
    """Placement over the measured runs; breakdown for the prefill (its first `prefill_runs` runs,
    more than one when the session fed the prompt in chunks) and per decode step."""
    runs = split_runs(events)[n_warm_runs:]
    if len(runs) <= prefill_runs:
        raise ValueError("the profile holds no measured decode run")
    overall = summarize([e for r in runs for e in r], ort_provider)
    prefill = summarize([e for r in runs[:prefill_runs] for e in r], ort_provider)
    decode = summarize([e for r in runs[prefill_runs:] for e in r], ort_provider)
    n_dec = len(runs) - prefill_runs
    return {
        "nodes_on_provider": overall["nodes_on_provider"],
        "time_on_provider": overall["time_on_provider"],
        "prefill": {"op_ms": prefill["op_ms"], "block_ms": prefill["block_ms"]},
        "decode": {
            "op_ms": {k: v / n_dec for k, v in decode["op_ms"].items()},
            "block_ms": {k: v / n_dec for k, v in decode["block_ms"].items()},
        },
    }


def profile_run(artifact: Path, provider, threads: int | None, batch: int, prompt_len: int, seed: int = 0) -> dict:
    """A profiled session over one prefill + PROFILE_STEPS decode steps (after a warm-up of the same)."""
    from rwkv_opt.runtime import Session

    with tempfile.TemporaryDirectory(prefix="rwkv-opt-prof-") as tmp:
        sess = Session(artifact, provider, threads=threads, profile=str(Path(tmp) / "prof"))
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, sess.config.vocab, (batch, prompt_len), dtype=np.int64)
        steps = rng.integers(0, sess.config.vocab, (batch, PROFILE_STEPS), dtype=np.int64)
        for _ in range(2):
            _, st = sess.forward(prompt)
            for t in range(PROFILE_STEPS):
                _, st = sess.forward(steps[:, t : t + 1], st)
        used = sess.sess.get_providers()
        chunks = -(-prompt_len // sess.max_chunk)
        events = json.loads(Path(sess.sess.end_profiling()).read_text())
        del sess
    out = parse_profile(events, provider.ort_name, n_warm_runs=chunks + PROFILE_STEPS, prefill_runs=chunks)
    dropped = provider.ort_name not in used
    out["cpu_fallback"] = bool(provider.value != "cpu" and (dropped or out["time_on_provider"] < FALLBACK_TIME_SHARE))
    return out
