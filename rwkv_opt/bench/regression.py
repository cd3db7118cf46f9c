"""Precision regression checks: re-measure accuracy on a fixed seeded token set, compare with a baseline.

Baseline file (JSON, written atomically):
    {"schema": "rwkv-opt-baseline/1",
     "protocol": {"prompt_len": 64, "decode": 256, "batch": 2, "seed": 1234},
     "artifacts": {"<target name, or the directory's name>": {
         "provider": "cpu", "precision": ..., "source": ..., "created": ...,
         "metrics": {"max_rel_err": ..., "mean_kl": ..., "top1": ..., "state_drift": ...},
         "tolerances": {"<metric>": {"better": "lower" | "higher", "rel": r, "abs": a}, ...}}}}
A metric regresses when it is past its limit: base * (1 + rel) + abs for "lower is better",
base * (1 - rel) - abs for "higher is better", or not finite (a NaN figure is a regression). Edit
the tolerances in the file to loosen or tighten one artifact's check. Bad input (no file, bad JSON,
wrong schema, a metric or tolerance that is not a finite number, a protocol past its caps, an artifact
the baseline does not know, another source checkpoint or model shape, an artifact whose files do not
match their recorded sha256) is an RwkvOptError: exit code 2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rwkv_opt.artifact import MANIFEST_MAX_BYTES, verify_recorded, write_json

from rwkv_opt.outdir import WRITE_ERRNOS, write_refusal
from rwkv_opt.bench.source import ArtifactInfo, artifact_info, refuse_unrunnable
from rwkv_opt.config import Provider
from rwkv_opt.errors import RwkvOptError

SCHEMA_ID = "rwkv-opt-baseline/1"
PROTOCOL = {"prompt_len": 64, "decode": 256, "batch": 2, "seed": 1234}
# the largest protocol a baseline may ask for (a small file must not start an hours-long measurement)
PROTOCOL_MAX = {"prompt_len": 8192, "decode": 8192, "batch": 64, "seed": 2**63 - 1}
METRICS = ("max_rel_err", "mean_kl", "top1", "state_drift")
# Slack for run-to-run and machine-to-machine noise (other CPUs pick other matmul kernels) that is
# still far below what a real loss of precision does (a 5% weight error moves max|err|/std by ~1e-2).
TOLERANCES = {
    "max_rel_err": {"better": "lower", "rel": 1.0, "abs": 1e-5},
    "mean_kl": {"better": "lower", "rel": 1.0, "abs": 1e-8},
    "top1": {"better": "higher", "rel": 0.0, "abs": 0.005},
    "state_drift": {"better": "lower", "rel": 1.0, "abs": 1e-5},
}


@dataclass(frozen=True)
class Moved:
    key: str
    metric: str
    baseline: float
    now: float
    limit: float
    status: str  # "better", "worse", "REGRESSION"


def measure(info: ArtifactInfo, provider: Provider, protocol: dict, checkpoint=None) -> dict[str, float]:
    """The protocol's accuracy figures, measured in a worker process (see runner.run_worker)."""
    from rwkv_opt.bench.runner import measure_accuracy

    setting = (protocol["batch"], protocol["prompt_len"])
    row = measure_accuracy(info, provider, [list(setting)], None, protocol["decode"], protocol["seed"], checkpoint)[
        setting
    ]
    return {k: float(row[k]) for k in METRICS}


def baseline_key(info: ArtifactInfo, taken: set[str]) -> str:
    """Key by target name; fall back to the directory's name when two artifacts share a target."""
    return info.target if info.target not in taken else info.name


def _number(v) -> bool:
    """A finite int or float (JSON's true/false and NaN/Infinity are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def checked_info(artifact) -> ArtifactInfo:
    """artifact_info, after checking the artifact's files against their recorded sha256 (when recorded)."""
    info = artifact_info(artifact)
    verify_recorded(info.path)
    return info


def write_baseline(path: str | Path, artifacts, provider: str | None = None, checkpoint=None, progress=print) -> dict:
    infos = [checked_info(a) for a in artifacts]
    for info in infos:
        refuse_unrunnable(info, Provider(provider or info.target_provider))
    entries: dict[str, dict] = {}
    for info in infos:
        prov = Provider(provider or info.target_provider)
        key = baseline_key(info, set(entries))
        progress(f"measuring {info.name} ({info.target}) on {prov.value} as '{key}'")
        entries[key] = {
            "artifact": info.name,
            "target": info.target,
            "provider": prov.value,
            "precision": info.precision,
            "quantization": info.quantization,
            "source": info.digest,
            "config": info.config,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metrics": measure(info, prov, PROTOCOL, checkpoint),
            "tolerances": TOLERANCES,
        }
    doc = {"schema": SCHEMA_ID, "protocol": PROTOCOL, "artifacts": entries}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(path), doc)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise write_refusal(e, Path(path)) from None
    return doc


def _bad(path: Path, what: str) -> RwkvOptError:
    return RwkvOptError(f"baseline {path} {what}; recreate it with `rwkv-opt check --write-baseline {path} DIR...`.")


def _validate_entry(path: Path, key: str, e) -> None:
    if not isinstance(e, dict) or not isinstance(e.get("metrics"), dict) or not isinstance(e.get("tolerances"), dict):
        raise _bad(path, f"entry '{key}' lacks its metrics or tolerances")
    for m in METRICS:
        v, t = e["metrics"].get(m), e["tolerances"].get(m)
        if not _number(v):
            raise _bad(path, f"entry '{key}' has no finite number for metric '{m}' (got {json.dumps(v)[:40]})")
        if (
            not isinstance(t, dict)
            or t.get("better") not in ("lower", "higher")
            or not all(_number(t.get(x)) and t[x] >= 0 for x in ("rel", "abs"))
        ):
            raise _bad(
                path, f"entry '{key}' has no valid tolerance for '{m}' (better lower|higher, finite rel >= 0, abs >= 0)"
            )
    if e.get("provider") not in [p.value for p in Provider]:
        raise _bad(path, f"entry '{key}' names no known provider")
    if not isinstance(e.get("source", ""), str) or not isinstance(e.get("config", {}), dict):
        raise _bad(path, f"entry '{key}' has a source that is not a string or a config that is not an object")


def read_baseline(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RwkvOptError(
            f"baseline {path} does not exist; create it with `rwkv-opt check --write-baseline {path} DIR...`."
        )
    if path.stat().st_size > MANIFEST_MAX_BYTES:
        raise _bad(path, f"is {path.stat().st_size:,} bytes, far more than a baseline")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(path, f"is not valid JSON ({getattr(e, 'msg', e)})") from None
    except RecursionError:
        raise _bad(path, "nests too deeply to be a baseline") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_ID:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise _bad(path, f"has schema {found!r}, not {SCHEMA_ID!r}")
    proto = doc.get("protocol")
    if (
        not isinstance(proto, dict)
        or not all(
            isinstance(proto.get(k), int) and not isinstance(proto[k], bool) and 0 <= proto[k] <= PROTOCOL_MAX[k]
            for k in PROTOCOL
        )
        or proto["prompt_len"] < 1
        or proto["batch"] < 1
    ):
        raise _bad(
            path, "has no valid protocol (integers " + ", ".join(f"{k} <= {v}" for k, v in PROTOCOL_MAX.items()) + ")"
        )
    if not isinstance(doc.get("artifacts"), dict) or not doc["artifacts"]:
        raise _bad(path, "lists no artifacts")
    for key, e in doc["artifacts"].items():
        _validate_entry(path, key, e)
    return doc


def limit(base: float, tol: dict) -> float:
    if tol["better"] == "lower":
        return base * (1 + tol["rel"]) + tol["abs"]
    return base * (1 - tol["rel"]) - tol["abs"]


def compare(key: str, entry: dict, now: dict[str, float]) -> list[Moved]:
    """The metrics that moved (beyond float noise), each marked better / worse / REGRESSION."""
    out = []
    for m in METRICS:
        base, val, tol = float(entry["metrics"][m]), now[m], entry["tolerances"][m]
        lim = limit(base, tol)
        sign = 1 if tol["better"] == "lower" else -1
        if not math.isfinite(val) or sign * (val - lim) > 0:
            status = "REGRESSION"
        elif math.isclose(val, base, rel_tol=1e-3, abs_tol=1e-15):
            continue
        else:
            status = "better" if sign * (val - base) < 0 else "worse"
        out.append(Moved(key, m, base, val, lim, status))
    return out


def _find_entry(path: Path, doc: dict, info: ArtifactInfo) -> tuple[str, dict]:
    for key in (info.target, info.name):
        if key in doc["artifacts"]:
            e = doc["artifacts"][key]
            if e.get("source") and info.digest and e["source"] != info.digest:
                raise RwkvOptError(
                    f"{info.name} was built from {info.digest}, but baseline entry '{key}' in {path} "
                    f"was measured on {e['source']}; compare artifacts of the same checkpoint."
                )
            if e.get("config") and e["config"] != info.config:
                raise RwkvOptError(
                    f"{info.name} has another model shape than baseline entry '{key}' in {path} "
                    "was measured on; compare artifacts of the same model."
                )
            return key, e
    raise RwkvOptError(
        f"{info.name} (target {info.target}) is not in baseline {path} (it has: "
        f"{', '.join(doc['artifacts'])}); add it with --write-baseline."
    )


def check_baseline(path: str | Path, artifacts, checkpoint=None, progress=print) -> list[Moved]:
    """Re-measure each artifact with the baseline's protocol; return what moved (regressions marked)."""
    path = Path(path)
    doc = read_baseline(path)
    plan = []
    for a in artifacts:
        info = checked_info(a)
        key, entry = _find_entry(path, doc, info)
        refuse_unrunnable(info, Provider(entry["provider"]))
        plan.append((info, key, entry))
    moved = []
    for info, key, entry in plan:
        progress(f"checking {info.name} against '{key}' on {entry['provider']}")
        moved += compare(key, entry, measure(info, Provider(entry["provider"]), doc["protocol"], checkpoint))
    return moved


def moved_table(moved: list[Moved]) -> str:
    if not moved:
        return "nothing moved"
    lines = [f"{'artifact':<16} {'metric':<12} {'baseline':>11} {'now':>11} {'limit':>11}  status"]
    for m in moved:
        lines.append(f"{m.key:<16} {m.metric:<12} {m.baseline:>11.3e} {m.now:>11.3e} {m.limit:>11.3e}  {m.status}")
    return "\n".join(lines)
