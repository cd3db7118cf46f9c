"""llama.cpp as a peer: find a build, make GGUFs of a checkpoint, check llama.cpp's logits, run llama-bench.

    python benchmarks/llamacpp.py check [--llama-cpp DIR] [--checkpoint CKPT] [--tokens 64] [--json OUT]
    python benchmarks/llamacpp.py gguf CKPT [--llama-cpp DIR] [--work DIR]

A build is a llama.cpp CMake build directory with bin/llama-bench, bin/llama-quantize and bin/libllama.so
(or a directory holding them), taken from --llama-cpp, else $LLAMA_CPP_DIR, else the directory of
`llama-bench` on PATH. Its source tree, for convert_hf_to_gguf.py, is $LLAMA_CPP_SRC or the one the
build's CMakeCache.txt names.

GGUFs: CKPT -> `rwkv-opt convert CKPT --to hf` (our fla-hub folder) -> convert_hf_to_gguf.py --outtype
f32 -> llama-quantize to q8_0 and q4_0, each written under a temp name and renamed, and reused when
present. llama.cpp's RWKV-7 converter always reads the 65536-token World vocabulary, so a checkpoint
needs that vocabulary size: `world_checkpoint` writes the synthetic presets with it (the tiny preset's
dims with a 65536-row embedding and head).

check: llama.cpp's logits at every position of a random token sequence, run as one batch and token by
token (its prefill and decode paths), through llama-cpp-python's Python part loaded on the build's
libllama.so (LLAMA_CPP_LIB_PATH; install it without compiling with CMAKE_ARGS="-DLLAMA_BUILD=OFF
-DLLAVA_BUILD=OFF" pip install llama-cpp-python), against our numpy reference in float64; our
cpu-fp32 artifact (a Session) is compared with the same reference. Exit 1 when llama.cpp's f32 or our
cpu-fp32 logits miss --tol (max|diff| / std of the reference logits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rwkv_opt.errors import RwkvOptError  # noqa: E402

WORLD_VOCAB = 65536  # rows llama.cpp's converter gives the RWKV World tokenizer (65529 tokens + <s>, padded)
QUANT_TYPES = ("q8_0", "q4_0")
GGUF_TYPES = ("f32", *QUANT_TYPES)
TOOLS = ("llama-bench", "llama-quantize")


@dataclasses.dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp build: the directory of its programs and libllama.so, and its source tree (or None)."""

    bin: Path
    src: Path | None

    def tool(self, name: str) -> Path:
        path = self.bin / name
        if not path.is_file():
            raise RwkvOptError(f"{self.bin} has no {name}; build it there (ninja {name}).")
        return path

    def converter(self) -> Path:
        """convert_hf_to_gguf.py of the build's source tree."""
        script = self.src / "convert_hf_to_gguf.py" if self.src else None
        if script is None or not script.is_file():
            raise RwkvOptError(
                f"no convert_hf_to_gguf.py for the llama.cpp build in {self.bin} (source tree: {self.src}); "
                "set LLAMA_CPP_SRC to the llama.cpp source directory it was built from."
            )
        return script


def _source_dir(bin_dir: Path) -> Path | None:
    """$LLAMA_CPP_SRC, else the source directory the build's CMakeCache.txt records."""
    if os.environ.get("LLAMA_CPP_SRC"):
        return Path(os.environ["LLAMA_CPP_SRC"])
    for cache in (bin_dir.parent / "CMakeCache.txt", bin_dir / "CMakeCache.txt"):
        if cache.is_file():
            for line in cache.read_text(errors="replace").splitlines():
                if line.startswith("CMAKE_HOME_DIRECTORY:"):
                    return Path(line.split("=", 1)[1])
    return None


def build_at(path: Path, origin: str) -> LlamaCpp:
    """The build in `path` (a CMake build directory, or the directory holding llama-bench)."""
    for b in (path / "bin", path):
        if (b / "llama-bench").is_file():
            return LlamaCpp(b.resolve(), _source_dir(b.resolve()))
    raise RwkvOptError(
        f"{path} ({origin}) holds no llama-bench, nor bin/llama-bench; pass a llama.cpp CMake build directory "
        "built with the llama-bench and llama-quantize targets."
    )


def find_build(explicit: str | Path | None = None) -> LlamaCpp | None:
    """The build named by `explicit`, else $LLAMA_CPP_DIR, else llama-bench's directory on PATH; else None."""
    if explicit:
        return build_at(Path(explicit), "--llama-cpp")
    if os.environ.get("LLAMA_CPP_DIR"):
        return build_at(Path(os.environ["LLAMA_CPP_DIR"]), "$LLAMA_CPP_DIR")
    exe = shutil.which("llama-bench")
    return build_at(Path(exe).resolve().parent, "llama-bench on PATH") if exe else None


# ---- command lines ---------------------------------------------------------------------------------
def convert_command(build: LlamaCpp, hf_dir: Path, out: Path) -> list[str]:
    return [sys.executable, str(build.converter()), str(hf_dir), "--outtype", "f32", "--outfile", str(out)]


def quantize_command(build: LlamaCpp, src: Path, dst: Path, qtype: str) -> list[str]:
    return [str(build.tool("llama-quantize")), str(src), str(dst), qtype.upper()]


def bench_command(
    build: LlamaCpp, gguf: Path, threads: int, prompt_lens: list[int], n_gen: int, reps: int
) -> list[str]:
    """llama-bench: prefill at each prompt length (pp tests) and n_gen decoded tokens (one tg test), JSON out."""
    return [
        str(build.tool("llama-bench")),
        "-m",
        str(gguf),
        "-t",
        str(threads),
        "-p",
        ",".join(map(str, prompt_lens)),
        "-n",
        str(n_gen),
        "-r",
        str(reps),
        "-o",
        "json",
    ]


def run_tool(cmd: list[str], what: str, env: dict | None = None) -> str:
    """Run a llama.cpp step; its stdout, or one sentence with the command and its last error line."""
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        tail = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
        raise RwkvOptError(f"{what} failed (exit {p.returncode}: {tail}); command: {shlex.join(cmd)}")
    return p.stdout


# ---- llama-bench's JSON -> our rows --------------------------------------------------------------------
def parse_bench(text: str) -> dict:
    """llama-bench -o json -> a peers.py row: prefill tok/s per prompt length (median over repetitions),
    decode ms/token (1000 / tg tok/s: the median repetition as p50, the slowest as p95), build and CPU."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as e:
        raise RwkvOptError(f"llama-bench printed no JSON ({e}); run it with -o json.") from None
    res: dict = {}
    for t in tests:
        ts = t.get("samples_ts") or [t["avg_ts"]]
        if t["n_prompt"] and not t["n_gen"]:
            res[f"prefill_tok_s_{t['n_prompt']}"] = statistics.median(ts)
        elif t["n_gen"] and not t["n_prompt"]:
            res["decode_ms_p50"] = 1e3 / statistics.median(ts)
            res["decode_ms_p95"] = 1e3 / min(ts)
            res["decode_tokens"] = t["n_gen"]
        res["llama_build"] = f"{t['build_commit']} (build {t['build_number']})"
        res["llama_cpu"] = t.get("cpu_info", "")
        res["llama_model"] = f"{t.get('model_type', '')}, {t.get('model_size', 0) / 2**20:,.1f} MiB"
    if "decode_ms_p50" not in res:
        raise RwkvOptError("llama-bench's JSON has no decode (tg) test; pass -n with a token count above 0.")
    return res


# ---- checkpoints and GGUFs -----------------------------------------------------------------------------
def world_config(preset: str):
    """The synthetic preset's config with the World vocabulary size, which llama.cpp's converter needs."""
    from rwkv_opt.checkpoint.synth import preset_config

    cfg = preset_config(preset)
    return cfg if cfg.vocab == WORLD_VOCAB else dataclasses.replace(cfg, vocab=WORLD_VOCAB)


def world_checkpoint(preset: str, work: Path, progress: Callable[[str], None] = print) -> Path:
    """WORK/synth-PRESET-v65536.pth (made when missing): `rwkv-opt synth --preset PRESET` (bf16, seed 0) with the
    World vocabulary size."""
    from rwkv_opt.checkpoint.synth import SyntheticStateDict
    from rwkv_opt.checkpoint.torchzip import write_pth

    cfg = world_config(preset)
    ckpt = work / f"synth-{preset}-v{cfg.vocab}.pth"
    if not ckpt.is_file():
        progress(f"writing {ckpt}")
        work.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_name(f".{ckpt.name}.tmp-{os.getpid()}")
        write_pth(tmp, SyntheticStateDict(cfg))
        os.replace(tmp, ckpt)
    return ckpt


def build_artifact(ckpt: Path, target: str, out: Path, *extra: str) -> Path:
    """`rwkv-opt pipeline --target TARGET --checkpoint CKPT -o OUT [extra]`, unless OUT already holds one."""
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "rwkv_opt.cli", "pipeline", "--target", target, "--checkpoint", str(ckpt)]
        run_tool([*cmd, *extra, "-q", "-o", str(out)], f"building the {target} artifact")
    return out


def make_ggufs(build: LlamaCpp, ckpt: Path, work: Path, progress: Callable[[str], None] = print) -> dict[str, Path]:
    """WORK/STEM-{f32,q8_0,q4_0}.gguf for checkpoint `ckpt` (made when missing): type -> path."""
    out = {t: work / f"{ckpt.stem}-{t}.gguf" for t in GGUF_TYPES}
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix=".gguf-") as tmp:
        tmp = Path(tmp)
        if not out["f32"].is_file():
            progress(f"writing {out['f32']} (rwkv-opt convert --to hf, then convert_hf_to_gguf.py)")
            cmd = [sys.executable, "-m", "rwkv_opt.cli", "convert", str(ckpt), "--to", "hf", "-o", str(tmp / "hf")]
            run_tool(cmd, "rwkv-opt convert --to hf")
            run_tool(convert_command(build, tmp / "hf", tmp / "f32.gguf"), "convert_hf_to_gguf.py")
            os.replace(tmp / "f32.gguf", out["f32"])
        for q in QUANT_TYPES:
            if not out[q].is_file():
                progress(f"writing {out[q]} (llama-quantize)")
                run_tool(quantize_command(build, out["f32"], tmp / f"{q}.gguf", q), "llama-quantize")
                os.replace(tmp / f"{q}.gguf", out[q])
    return out


# ---- the logits check ----------------------------------------------------------------------------------
def llama_logits(build: LlamaCpp, gguf: Path, tokens: list[int], threads: int, steps: bool) -> np.ndarray:
    """llama.cpp's logits (T, V) at every position: the tokens as one batch, or one decode call per token."""
    if not (build.bin / "libllama.so").is_file():
        raise RwkvOptError(f"{build.bin} has no libllama.so, which the check loads; build it there (ninja llama).")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(build.bin)  # read when llama_cpp is first imported
    try:
        from llama_cpp import Llama
    except ImportError:
        raise RwkvOptError(
            "the check needs llama-cpp-python's Python part; install it without compiling: "
            'CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install llama-cpp-python==0.3.36'
        ) from None
    n = len(tokens)
    llm = Llama(model_path=str(gguf), n_ctx=n, n_batch=n, n_ubatch=n, n_threads=threads, logits_all=True, verbose=False)
    for chunk in [[t] for t in tokens] if steps else [tokens]:
        llm.eval(chunk)
    return np.array(llm.scores[:n], dtype=np.float64)


def compare(got: np.ndarray, ref: np.ndarray) -> dict:
    """compare_logits (max|diff| / std(ref), mean KL, top-1 agreement) and the plain max|diff|."""
    from rwkv_opt.bench.metrics import compare_logits

    return {"max_abs_diff": float(np.abs(got - ref).max()), **compare_logits(ref, got)}


def check(build: LlamaCpp, ckpt: Path, work: Path, n_tokens: int, threads: int, quant: bool) -> dict:
    """llama.cpp (f32 batch and steps, and q8_0/q4_0 when `quant`) and our cpu-fp32 vs the float64 reference."""
    from rwkv_opt.checkpoint.weights import load_weights
    from rwkv_opt.reference import ReferenceModel
    from rwkv_opt.runtime import Session

    ggufs = make_ggufs(build, ckpt, work, progress=lambda m: print(m, file=sys.stderr))
    weights = load_weights(ckpt, digest=False)
    tokens = [int(t) for t in np.random.default_rng(0).integers(1, weights.config.vocab, n_tokens)]
    ref = ReferenceModel(weights, np.float64).forward([tokens])[0][0]
    art = build_artifact(ckpt, "cpu-fp32", work / f"{ckpt.stem}-cpu-fp32-all", "--no-verify", "--logits", "all")
    ours = Session(art, threads=threads).forward(np.asarray([tokens]))[0][0].astype(np.float64)
    f32 = llama_logits(build, ggufs["f32"], tokens, threads, steps=False)
    rows = {
        "rwkv-opt cpu-fp32": compare(ours, ref),
        "llama.cpp f32, one batch": compare(f32, ref),
        "llama.cpp f32, token by token": compare(llama_logits(build, ggufs["f32"], tokens, threads, steps=True), ref),
    }
    for q in QUANT_TYPES if quant else ():
        rows[f"llama.cpp {q}, one batch"] = compare(llama_logits(build, ggufs[q], tokens, threads, False), ref)
    rows["llama.cpp f32 vs rwkv-opt cpu-fp32"] = compare(f32, ours)
    return {"checkpoint": str(ckpt), "tokens": n_tokens, "config": dataclasses.asdict(weights.config), "rows": rows}


def check_table(res: dict) -> str:
    c = res["config"]
    lines = [
        f"Logits at all {res['tokens']} positions of a random token sequence, {res['checkpoint']} "
        f"({c['n_layer']} layers, C={c['n_embd']}, V={c['vocab']}), vs the numpy reference in float64:",
        "",
        "| run | max abs diff | max abs diff / std(ref) | mean KL | argmax agrees |",
        "|---|---|---|---|---|",
    ]
    for name, r in res["rows"].items():
        lines.append(
            f"| {name} | {r['max_abs_diff']:.3g} | {r['max_rel_err']:.3g} | {r['mean_kl']:.3g} | {r['top1']:.1%} |"
        )
    return "\n".join(lines)


CHECKED = ("rwkv-opt cpu-fp32", "llama.cpp f32, one batch", "llama.cpp f32, token by token")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="llama.cpp's and our fp32 logits vs the numpy reference")
    c.add_argument("--checkpoint", type=Path, help="a .pth with a 65536-token vocabulary (default: tiny preset)")
    c.add_argument("--preset", default="tiny", help="synthetic preset when no --checkpoint (World vocabulary)")
    c.add_argument("--tokens", type=int, default=64)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--tol", type=float, default=1e-4, help="max|diff| / std(ref) allowed for the fp32 runs")
    c.add_argument("--no-quant", action="store_true", help="skip the q8_0 and q4_0 rows")
    c.add_argument("--json", type=Path, help="also write the figures here")
    g = sub.add_parser("gguf", help="write the f32, q8_0 and q4_0 GGUFs of a checkpoint")
    g.add_argument("checkpoint", type=Path)
    for p in (c, g):
        p.add_argument("--llama-cpp", help="llama.cpp build directory (else $LLAMA_CPP_DIR, else PATH)")
        p.add_argument("--work", type=Path, default=Path("/tmp/rwkv-opt-llamacpp"), help="GGUF/scratch dir")
    a = ap.parse_args(argv)
    try:
        return _run(a)
    except RwkvOptError as e:
        print(f"llamacpp.py: error: {e}", file=sys.stderr)
        return e.exit_code


def _run(a) -> int:
    build = find_build(a.llama_cpp)
    if build is None:
        raise RwkvOptError(
            "no llama.cpp build found; pass --llama-cpp DIR, set LLAMA_CPP_DIR, or put llama-bench on PATH."
        )
    if a.command == "gguf":
        for t, path in make_ggufs(build, a.checkpoint, a.work).items():
            print(f"{t}: {path}")
        return 0
    ckpt = a.checkpoint or world_checkpoint(a.preset, a.work, progress=lambda m: print(m, file=sys.stderr))
    res = check(build, ckpt, a.work, a.tokens, a.threads, quant=not a.no_quant)
    print(check_table(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    bad = [n for n in CHECKED if res["rows"][n]["max_rel_err"] > a.tol]
    if bad:
        print(f"above --tol {a.tol:g}: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
