"""rwkv-opt command line: a thin layer over the library (parse, call, print)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rwkv_opt import __version__
from rwkv_opt.errors import RwkvOptError

PRESETS_HELP = "tiny (2 layers, seconds), 0.1b, 0.4b, 1.5b, 2.9b, 7.2b"


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless it is None/False or the text already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (
            d is None
            or d is False
            or d == []
            or d is argparse.SUPPRESS
            or "default" in text
            or (not action.option_strings and action.nargs not in ("?", "*"))
        ):
            return text
        shown = ",".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
        return f"{text} (default: {shown.replace('%', '%%')})".strip()


def _quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="print no progress, only the result and errors")


_CHECKPOINT_HELP = "RWKV-7 checkpoint: BlinkDL .pth, .safetensors with BlinkDL keys, or an fla-hub Hugging Face folder"


def _source_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument(
            "checkpoint",
            nargs="?",
            type=Path,
            help=_CHECKPOINT_HELP + " (omitted: the built-in synthetic model of --preset)",
        )
    else:
        p.add_argument(
            "--checkpoint", type=Path, help=_CHECKPOINT_HELP + " (omitted: the built-in synthetic model of --preset)"
        )
    p.add_argument("--preset", default="tiny", help=f"synthetic preset when no checkpoint is given: {PRESETS_HELP}")
    p.add_argument("--deepembed", action="store_true", help="synthetic model: RWKV-7a (DeepEmbed) instead of RWKV-7")
    p.add_argument("--seed", type=int, default=0, help="synthetic model: seed of its random weights")


def _weights(a):
    from rwkv_opt.checkpoint import load_source

    return load_source(a.checkpoint, a.preset, a.deepembed, a.seed)


def cmd_synth(a) -> int:
    from rwkv_opt.checkpoint.synth import synthetic_state_dict
    from rwkv_opt.checkpoint.torchzip import write_pth
    from rwkv_opt.progress import set_sink, stderr_line

    sd = synthetic_state_dict(a.preset, deepembed=a.deepembed, seed=a.seed, dtype=a.dtype)
    with set_sink(None if a.quiet else stderr_line):  # a bar or lines with an ETA (a 7.2b preset takes minutes)
        write_pth(a.output, sd)
    c = sd.config
    print(
        f"wrote {a.output}: {a.preset}{' DeepEmbed' if a.deepembed else ''}, {c.n_layer} layers, C={c.n_embd}, "
        f"V={c.vocab}, {c.n_params():,} params, {a.dtype} (random weights: its text is noise, its logits "
        "near-flat)"
    )
    return 0


def cmd_build(a) -> int:
    import onnx

    from rwkv_opt.artifact import MODEL_FILE, Manifest, save_model

    from rwkv_opt.outdir import staging_dir
    from rwkv_opt.graph.model import BuildOptions, LogitsMode, build_model
    from rwkv_opt.pipeline import check_onnx
    from rwkv_opt.progress import set_sink, stderr_line
    from rwkv_opt.tensorstore import scratch_store

    if not 18 <= a.opset <= onnx.defs.onnx_opset_version():  # 18: ReduceL2 with axes as an input
        raise RwkvOptError(
            f"--opset must be between 18 and {onnx.defs.onnx_opset_version()} (this onnx's newest), got {a.opset}."
        )
    w = _weights(a)
    with set_sink(None if a.quiet else stderr_line), staging_dir(a.output) as tmp, scratch_store(tmp):
        model = build_model(w, BuildOptions(logits=LogitsMode(a.logits), opset=a.opset))
        check_onnx(model, "build")
        save_model(model, tmp / MODEL_FILE, external=a.external_data or None)
        Manifest(
            target="base-fp32",
            provider="cpu",
            precision="fp32",
            quantization="none",
            logits=a.logits,
            source=w.manifest_source(),
        ).write(tmp)
    print(f"wrote {a.output}/{MODEL_FILE} ({len(model.graph.node)} nodes)")
    return 0


def cmd_pipeline(a) -> int:
    from rwkv_opt.graph.model import LogitsMode
    from rwkv_opt.pipeline import run_pipeline
    from rwkv_opt.progress import stderr_line
    from rwkv_opt.targets import get_target

    target = get_target(a.target)  # refuse an unknown target before loading anything
    if a.wkv_op:
        target = target.with_wkv_op()
    heads = [(h, {}) for h in a.head]
    if a.keep_unverified and a.no_verify:
        raise RwkvOptError(
            "--keep-unverified keeps an artifact that failed verification, and --no-verify skips "
            "verification; pass one of them."
        )
    w = _weights(a)
    m = run_pipeline(
        target,
        w,
        a.output,
        heads=heads,
        logits=LogitsMode(a.logits) if a.logits else None,
        do_verify=not a.no_verify,
        quant_algorithm=a.quant_algorithm,
        keep_unverified=a.keep_unverified,
        progress=(lambda _m: None) if a.quiet else stderr_line,
    )
    for line in verification_lines(target, m.get("verification", {})):
        print(line)
    print(f"artifact: {a.output} ({m['total_seconds']:.1f}s)")
    return 0


def verification_lines(target, v: dict) -> list[str]:
    """What verification did and decided, for a person: the figures, the positions and why that many,
    and the binomial test's decision when top-1 is under the budget's rate."""
    from rwkv_opt.targets import TOP1_ALPHA

    if "top1" not in v:
        return [f"{target.name}: verification skipped: {v['skipped']}"] if v else []
    b = target.budget
    verdict = "verified" if v["within_budget"] else "FAILED verification (kept unverified)"
    out = [
        f"{target.name}: {verdict} vs numpy reference on {v['positions']} positions: "
        f"max|err|/std {v['max_rel_err']:.2e}, mean KL {v['mean_kl']:.2e}, top-1 {v['top1']:.2%}, "
        f"state drift {v['state_drift']:.2e}"
    ]
    if v.get("protocol"):
        out.append(f"  checked: {v['protocol']}")
    if v.get("scope"):
        out.append(f"  scope: {v['scope']}")
    hits = round(v["top1"] * v["positions"])
    if v["top1"] < b.min_top1:
        accepted = not any(m.startswith("top-1") for m in v.get("misses", []))
        out.append(
            f"  top-1 {hits}/{v['positions']} is under the {b.min_top1:.0%} budget rate; the one-sided "
            f"binomial test {'accepts' if accepted else 'refuses'} it: p = {v['top1_p_value']:.3f} "
            f"{'>=' if accepted else '<'} {TOP1_ALPHA} that a {b.min_top1:.0%} rate agrees this little "
            f"or less"
        )
    out.append(
        f"  budget: top-1 >= {b.min_top1:.0%} (binomial test), max|err|/std <= {b.max_rel_err}, "
        f"mean KL <= {b.max_kl}" + ("" if v["within_budget"] else "; missed: " + "; ".join(v["misses"]))
    )
    return out


def cmd_targets(a) -> int:
    from rwkv_opt.targets import TARGETS, get_target, runnable_here

    if a.name:
        print(target_detail(get_target(a.name)))
        return 0
    for t in TARGETS.values():
        here = runnable_here(t)
        print(f"{t.name:<12} {t.provider.value:<5} {t.precision.value:<11} passes: {' -> '.join(t.pass_names)}")
        print(
            f"{'':<12} {t.description}; budget top1>={t.budget.min_top1}, max|err|/std<={t.budget.max_rel_err}, "
            f"KL<={t.budget.max_kl}{'' if here is None else '  [cannot run here: build only]'}"
        )
    print("`rwkv-opt targets NAME` shows one target's pass configs, budget and the ops its provider must run.")
    return 0


def target_detail(t) -> str:
    """`rwkv-opt targets NAME`: the target's passes with the configs they run with, its budget, and what
    the execution provider must support (the ops of the tiny synthetic model built through its passes)."""
    from rwkv_opt.passes.base import get_pass
    from rwkv_opt.pipeline import VERIFY_TOKENS, verify_tokens
    from rwkv_opt.targets import TOP1_ALPHA, runnable_here

    b = t.budget
    here = runnable_here(t)
    lines = [
        f"{t.name}: {t.description}",
        f"  provider   {t.provider.value} ({t.provider.ort_name}); precision {t.precision.value}; "
        f"quantization {t.quantization}; logits {t.logits.value}",
        f"  here       {'runs on this machine' if here is None else 'build only: ' + here}",
        "  passes, in order, with the config each runs with:",
    ]
    for i, (name, overrides) in enumerate(t.passes, 1):
        cls = get_pass(name)
        cfg = cls.configure(overrides).config_dict()
        lines.append(f"    {i}. {name:<11} {cls.description}".rstrip())
        lines.append(f"       {', '.join(f'{k}={_plain(v)}' for k, v in cfg.items()) or '(no options)'}")
    prompt, decode = verify_tokens(t)
    slow = "; bf16 runs emulated in onnx.reference, ~100x slower" if (prompt, decode) != VERIFY_TOKENS else ""
    lines += [
        f"  budget vs the fp32 numpy reference ({decode + 1} teacher-forced positions: {prompt} prompt "
        f"tokens, {decode} decoded{slow}):",
        f"    top-1 agreement >= {b.min_top1:.0%} (refused when a one-sided binomial test gives p < "
        f"{TOP1_ALPHA}), max|err|/std <= {b.max_rel_err}, mean KL <= {b.max_kl}",
        "  the execution provider must run (the tiny synthetic model through these passes):",
        *(f"    {line}" for line in _target_ops(t)),
    ]
    return "\n".join(lines)


def _plain(value) -> str:
    """A pass config value as JSON (enums by their value, tuples as lists)."""
    import enum
    import json

    return json.dumps(value, default=lambda v: v.value if isinstance(v, enum.Enum) else str(v))


def _node_ops(nodes, ops: dict) -> None:
    """Collect (domain -> op types) of `nodes` and of the subgraphs inside them (If, Scan, Loop)."""
    for n in nodes:
        ops.setdefault(n.domain or "ai.onnx", set()).add(n.op_type)
        for attr in n.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _node_ops(g.node, ops)


def _target_ops(t) -> list[str]:
    """The op types per domain and the weight dtypes of the tiny synthetic model built through `t`'s
    passes (a second or two): what an execution provider needs kernels for."""
    import onnx

    from rwkv_opt.checkpoint import load_source
    from rwkv_opt.graph.model import BuildOptions, build_model
    from rwkv_opt.pipeline import run_passes

    model, _ = run_passes(
        build_model(load_source(None, "tiny"), BuildOptions(logits=t.logits)), list(t.passes), progress=lambda _m: None
    )
    ops: dict[str, set] = {}
    _node_ops(model.graph.node, ops)
    for f in model.functions:  # function bodies are what runs when the EP has no kernel for the function
        _node_ops(f.node, ops)
    dtypes = sorted(
        {
            onnx.helper.tensor_dtype_to_string(w.data_type).removeprefix("TensorProto.").lower()
            for w in model.graph.initializer
        }
    )
    return [f"{d} ops: {', '.join(sorted(o))}" for d, o in sorted(ops.items())] + [f"weights: {', '.join(dtypes)}"]


def cmd_inspect(a) -> int:
    from rwkv_opt.inspect import describe

    text = describe(a.artifact, as_json=a.json, verify=a.verify)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `rwkv-opt inspect DIR | head`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not raise again
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rwkv_opt.targets import TARGETS

    ap = argparse.ArgumentParser(
        prog="rwkv-opt",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog="`rwkv-opt COMMAND --help` shows a command's options; start with `rwkv-opt pipeline -o work/demo`.",
    )
    ap.add_argument("--version", action="version", version=f"rwkv-opt {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic RWKV-7(a) .pth checkpoint (random weights)")
    p.add_argument("--preset", default="tiny", help=f"model size: {PRESETS_HELP}")
    p.add_argument("--deepembed", action="store_true", help="RWKV-7a (DeepEmbed) instead of RWKV-7")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--dtype",
        default="bf16",
        choices=["bf16", "fp16", "fp32"],
        help="weight dtype in the file (BlinkDL's releases are bf16)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="the .pth file to write")
    _quiet_arg(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("build", help="build the base fp32 ONNX graph from a checkpoint")
    _source_args(p, positional=True)
    p.add_argument(
        "--logits",
        default="all",
        choices=["all", "last"],
        help="head output: logits at every position, or at the last one only",
    )
    p.add_argument("--opset", type=int, default=21, help="ONNX opset of the graph")
    p.add_argument("--external-data", action="store_true", help="weights in model.onnx.data")
    p.add_argument("-o", "--output", type=Path, required=True, help="artifact directory to write")
    _quiet_arg(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("pipeline", help="build, optimize and verify an artifact for a target")
    p.add_argument(
        "--target",
        default="cpu-fp32",
        metavar="NAME",
        help=f"one of: {', '.join(TARGETS)} (`rwkv-opt targets NAME` shows one)",
    )
    _source_args(p)
    p.add_argument(
        "--head",
        action="append",
        default=[],
        choices=["sampling", "sft", "reinforce"],
        help="attach a head (repeatable): in-graph sampling, or a training step",
    )
    p.add_argument("--logits", choices=["all", "last"], help="override the target's logits mode")
    p.add_argument(
        "--wkv-op",
        action="store_true",
        help="one rwkv7.WKV7 node per layer (ONNX function body) for runtimes with their own WKV kernel",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the accuracy check against the numpy reference (the manifest's verification says "
        '"status": "skipped")',
    )
    p.add_argument(
        "--keep-unverified",
        action="store_true",
        help="write the artifact even when it misses its accuracy budget; its manifest then says "
        '"verification": {"status": "failed", ...} (inspect shows it)',
    )
    p.add_argument(
        "--quant-algorithm",
        choices=["auto", "gptq", "rtn"],
        default="auto",
        help="quantized targets: GPTQ (calibrated, about 20 percent lower KL) or round-to-nearest; "
        "auto keeps the target's choice up to 1.6B parameters (0.5B for fp16 targets) and "
        "takes RTN above, where GPTQ's time grows faster than the model (reports/scale.md)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="artifact directory to write")
    _quiet_arg(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("targets", help="list targets, or show one: its passes and configs, budget and ops")
    p.add_argument("name", nargs="?", metavar="NAME", help=f"a target to show in detail: {', '.join(TARGETS)}")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("inspect", help="show an artifact's config, I/O, sizes, metadata and verification")
    p.add_argument("artifact", type=Path, help="artifact directory (or its model.onnx)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true", help="check every file against the sha256 in manifest.json")
    p.set_defaults(func=cmd_inspect)

    for extra in (
        "rwkv_opt.bench.cli",
        "rwkv_opt.generate_cli",
        "rwkv_opt.train_cli",
        "rwkv_opt.convert_cli",
        "rwkv_opt.export_cli",
    ):
        try:
            mod = __import__(extra, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != extra:
                raise
            continue
        mod.register(sub)
    for p in sub.choices.values():  # the registered commands' help shows their defaults too
        p.formatter_class = HelpFormatter
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
