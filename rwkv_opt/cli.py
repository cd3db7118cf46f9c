"""rwkv-opt command line: a thin layer over the library (parse, call, print)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rwkv_opt.errors import RwkvOptError


def _source_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("checkpoint", nargs="?", type=Path, help="BlinkDL RWKV-7 .pth (default: synthetic preset)")
    else:
        p.add_argument("--checkpoint", type=Path, help="BlinkDL RWKV-7 .pth (default: built-in synthetic model)")
    p.add_argument("--preset", default="tiny", help="synthetic preset when no checkpoint is given (tiny, 0.1b, ...)")
    p.add_argument("--deepembed", action="store_true", help="synthetic RWKV-7a (DeepEmbed)")
    p.add_argument("--seed", type=int, default=0, help="synthetic seed")


def _weights(a):
    from rwkv_opt.checkpoint import load_source

    return load_source(a.checkpoint, a.preset, a.deepembed, a.seed)


def cmd_synth(a) -> int:
    from rwkv_opt.checkpoint.synth import synthetic_state_dict
    from rwkv_opt.checkpoint.torchzip import write_pth

    from rwkv_opt.progress import set_sink

    sd = synthetic_state_dict(a.preset, deepembed=a.deepembed, seed=a.seed, dtype=a.dtype)
    with set_sink():  # progress with an ETA on stderr (a 7.2b preset takes minutes)
        write_pth(a.output, sd)
    c = sd.config
    print(f"wrote {a.output}: {a.preset}{' DeepEmbed' if a.deepembed else ''}, {c.n_layer} layers, C={c.n_embd}, "
          f"V={c.vocab}, {c.n_params():,} params, {a.dtype}")
    return 0


def cmd_build(a) -> int:
    import onnx

    from rwkv_opt.artifact import MANIFEST_FILE, MODEL_FILE, save_model, staging_dir, write_json
    from rwkv_opt.graph.model import BuildOptions, LogitsMode, build_model
    from rwkv_opt.pipeline import check, versions

    from rwkv_opt.tensorstore import scratch_store

    if not 18 <= a.opset <= onnx.defs.onnx_opset_version():  # 18: ReduceL2 with axes as an input
        raise RwkvOptError(f"--opset must be between 18 and {onnx.defs.onnx_opset_version()} (this onnx's newest), "
                           f"got {a.opset}.")
    w = _weights(a)
    with staging_dir(a.output) as tmp, scratch_store(tmp):  # weights go to disk as they are made
        model = build_model(w, BuildOptions(logits=LogitsMode(a.logits), opset=a.opset))
        check(model, "build")
        save_model(model, tmp / MODEL_FILE, external=a.external_data or None)
        write_json(tmp / MANIFEST_FILE, {"tool": "rwkv-opt", "target": "base-fp32", "precision": "fp32",
                                         "provider": "cpu", "quantization": "none", "logits": a.logits,
                                         "source": {"path": w.source, "digest": w.digest or "synthetic",
                                                    "config": w.config.to_dict()},
                                         "passes": [], "versions": versions()})
    print(f"wrote {a.output}/{MODEL_FILE} ({len(model.graph.node)} nodes)")
    return 0


def cmd_pipeline(a) -> int:
    from rwkv_opt.pipeline import run_pipeline
    from rwkv_opt.graph.model import LogitsMode
    from rwkv_opt.targets import get_target

    target = get_target(a.target)  # refuse an unknown target before loading anything
    if a.wkv_op:
        target = target.with_wkv_op()
    heads = [(h, {}) for h in a.head]
    w = _weights(a)
    m = run_pipeline(target, w, a.output, heads=heads, logits=LogitsMode(a.logits) if a.logits else None,
                     do_verify=not a.no_verify, quant_algorithm=a.quant_algorithm)
    v = m.get("verification", {})
    if "top1" in v:
        print(f"{target.name}: verified vs numpy reference on {v['positions']} positions: "
              f"max|err|/std {v['max_rel_err']:.2e}, mean KL {v['mean_kl']:.2e}, top-1 {v['top1']:.2%}, "
              f"state drift {v['state_drift']:.2e}")
    elif v:
        print(f"{target.name}: verification skipped: {v['skipped']}")
    print(f"artifact: {a.output} ({m['total_seconds']:.1f}s)")
    return 0


def cmd_targets(a) -> int:
    from rwkv_opt.targets import TARGETS, runnable_here

    for t in TARGETS.values():
        here = runnable_here(t)
        print(f"{t.name:<12} {t.provider.value:<5} {t.precision.value:<11} passes: {' -> '.join(t.pass_names)}")
        print(f"{'':<12} {t.description}; budget top1>={t.budget.min_top1}, max|err|/std<={t.budget.max_rel_err}, "
              f"KL<={t.budget.max_kl}{'' if here is None else '  [cannot run here: build only]'}")
    return 0


def cmd_inspect(a) -> int:
    from rwkv_opt.inspect import describe

    print(describe(a.artifact, as_json=a.json, verify=a.verify))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rwkv-opt", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic RWKV-7(a) .pth checkpoint")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--deepembed", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("build", help="build the base fp32 ONNX graph from a checkpoint")
    _source_args(p, positional=True)
    p.add_argument("--logits", default="all", choices=["all", "last"])
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--external-data", action="store_true", help="weights in model.onnx.data")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("pipeline", help="build, optimize and verify an artifact for a target")
    p.add_argument("--target", default="cpu-fp32")
    _source_args(p)
    p.add_argument("--head", action="append", default=[], help="attach a head: sampling, sft, reinforce")
    p.add_argument("--logits", choices=["all", "last"], help="override the target's logits mode")
    p.add_argument("--wkv-op", action="store_true",
                   help="one rwkv7.WKV7 node per layer (ONNX function body) for runtimes with their own WKV kernel")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the accuracy check against the numpy reference (the manifest says so)")
    p.add_argument("--quant-algorithm", choices=["auto", "gptq", "rtn"], default="auto",
                   help="quantized targets: GPTQ (calibrated, about 20 percent lower KL) or round-to-nearest; "
                        "auto keeps the target's choice up to 1.6B parameters (0.5B for fp16 targets) and "
                        "takes RTN above, where "
                        "GPTQ's time grows faster than the model (reports/scale.md)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("targets", help="list targets and their passes")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("inspect", help="show an artifact's config, I/O, sizes and metadata")
    p.add_argument("artifact", type=Path)
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true", help="check every file against the sha256 in manifest.json")
    p.set_defaults(func=cmd_inspect)

    for extra in ("rwkv_opt.bench.cli", "rwkv_opt.generate_cli", "rwkv_opt.train_cli"):
        try:
            mod = __import__(extra, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != extra:
                raise
            continue
        mod.register(sub)
    return ap


def _terminate(signum, _frame):
    """SIGTERM/SIGHUP unwind like Ctrl-C, so staging directories and scratch weights are removed."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    import signal

    ap = build_parser()
    a = ap.parse_args(argv)
    previous = {}
    for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
        try:
            previous[sig] = signal.signal(sig, _terminate)
        except (TypeError, ValueError, OSError):  # not the main thread, or no such signal here
            pass
    try:
        return a.func(a) or 0
    except RwkvOptError as e:
        print(f"rwkv-opt: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
