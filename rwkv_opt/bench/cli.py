"""`rwkv-opt bench` and `rwkv-opt check` (registered by rwkv_opt.cli through `register(subparsers)`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4; got '{text}'") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


def str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_bench(a) -> int:
    from rwkv_opt.bench.report import SUMMARY, markdown_table, write_report
    from rwkv_opt.bench.runner import run
    from rwkv_opt.artifact import versions

    df = run(
        a.artifacts,
        providers=a.providers,
        batches=a.batch,
        prompt_lens=a.prompt_lens,
        decode=a.decode,
        repeat=a.repeat,
        threads=a.threads,
        accuracy=not a.no_accuracy,
        profile=a.profile,
        drift_tokens=a.drift_tokens,
        checkpoint=a.checkpoint,
    )
    command = "rwkv-opt " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    paths = write_report(df, a.output, {"command": command, "versions": versions(), "threads": a.threads})
    print(markdown_table(df, SUMMARY))
    prof = df.attrs.get("profile")
    if prof is not None and len(prof):
        print("\nprofile, top op types and blocks (ms; decode per step):")
        for keys, g in prof.groupby(["artifact", "provider", "batch", "prompt_len", "phase", "kind"], sort=False):
            top = ", ".join(f"{r.group} {r.ms:.3g} ({r.share:.0%})" for r in g.nlargest(5, "ms").itertuples())
            print(f"  {keys[0]} {keys[1]} B={keys[2]} T={keys[3]} {keys[4]} by {keys[5]}: {top}")
    print("\nreport: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_check(a) -> int:
    from rwkv_opt.bench.regression import check_baseline, moved_table, write_baseline

    if a.write_baseline:
        doc = write_baseline(
            a.write_baseline, a.artifacts, provider=a.provider, checkpoint=a.checkpoint, progress=_stderr
        )
        print(f"wrote baseline {a.write_baseline} for: {', '.join(doc['artifacts'])}")
        return 0
    moved = check_baseline(a.baseline, a.artifacts, checkpoint=a.checkpoint, progress=_stderr)
    print(moved_table(moved))
    regressions = [m for m in moved if m.status == "REGRESSION"]
    if regressions:
        print(f"{len(regressions)} regression(s) against {a.baseline}")
        return 1
    print(f"no regression against {a.baseline}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark artifacts per provider (latency, memory, accuracy) into a report")
    p.add_argument("artifacts", nargs="+", type=Path, metavar="DIR", help="artifact directories")
    p.add_argument("--providers", type=str_list, default=("cpu",), help="comma-separated EPs (default: cpu)")
    p.add_argument("--batch", type=int_list, default=(1,), help="batch sizes, e.g. 1,4 (default: 1)")
    p.add_argument("--prompt-lens", type=int_list, default=(128,), help="prompt lengths, e.g. 128,512 (default: 128)")
    p.add_argument("--decode", type=int, default=128, help="timed decode steps per repeat (default: 128)")
    p.add_argument("--repeat", type=int, default=3, help="repeats; figures are medians (default: 3)")
    p.add_argument("--threads", type=int, help="ORT intra-op threads (default: ORT's choice)")
    p.add_argument(
        "--drift-tokens",
        type=int,
        default=1024,
        help="teacher-forced decode steps for the accuracy and state drift figures (default: 1024)",
    )
    p.add_argument("--no-accuracy", action="store_true", help="skip the comparison with the numpy reference")
    p.add_argument("--profile", action="store_true", help="time per op type and per block (ORT profiler)")
    p.add_argument(
        "--checkpoint", type=Path, help="the .pth the artifacts were built from, if not at its recorded path"
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="report directory")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "check", help="precision regression check of artifacts against a baseline (exit 1 on regression)"
    )
    p.add_argument("artifacts", nargs="+", type=Path, metavar="DIR", help="artifact directories")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--baseline", type=Path, help="baseline JSON to compare with")
    g.add_argument("--write-baseline", type=Path, help="measure the artifacts and write this baseline JSON")
    p.add_argument(
        "--provider",
        choices=["cpu", "cuda"],
        help="with --write-baseline: EP to measure on (default: each artifact's own)",
    )
    p.add_argument(
        "--checkpoint", type=Path, help="the .pth the artifacts were built from, if not at its recorded path"
    )
    p.set_defaults(func=cmd_check)
