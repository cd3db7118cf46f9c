"""The Pass contract and registry.

A pass is a small named unit with a frozen, typed config. The base class enforces its contract:

    config.problem()   the config's own validation (values out of range); None when fine
    requires(model)    precondition on the model: why the pass cannot run on it, or None
    run(model)         the rewrite -> PassResult(model, changed, notes)
    ensures(model)     postcondition on the result (e.g. the fp32 WKV state path); None when it holds

and how a pass treats its input is declared, not a convention: `in_place = True` passes edit the
model they are given and return it; functional passes (the default) return a new model and leave
their input untouched (its structure and metadata are fingerprinted around run() to prove it), or
return it unchanged with changed=False. Order rules between passes are preconditions: requires() reads
what earlier passes recorded in the model (`rwkv_opt.passes` metadata, precision), so they hold for
models made by another process too. Passes register under a stable name; targets name them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import ClassVar

import onnx

from rwkv_opt.errors import RwkvOptError
from rwkv_opt.graph.contract import Key, Meta, get_meta, set_meta  # noqa: F401  (passes import them here)
from rwkv_opt.onnx_util import drop_dead, fresh_name, names_read, weightless  # noqa: F401  (passes import them here)


@dataclass
class PassResult:
    model: onnx.ModelProto
    changed: bool
    notes: list[str] = field(default_factory=list)


class PassRefused(RwkvOptError):
    """A pass's config or precondition does not hold for this model."""


class PassBug(RwkvOptError):
    """A pass broke its own contract (in-place/functional, postcondition): a bug in rwkv-opt."""

    exit_code = 3


@dataclass(frozen=True)
class PassConfig:
    """Base for pass configs (frozen, typed, with defaults). Enum fields accept their values as strings
    (coerce in __post_init__); range checks go in problem(), which the base calls before requires()."""

    def problem(self) -> str | None:
        return None


def _fingerprint(model: onnx.ModelProto) -> str:
    """A digest of the model's structure and metadata (weights by name and shape, not by value)."""
    h = hashlib.sha256(weightless(model).SerializeToString(deterministic=True))
    for p in model.metadata_props:
        h.update(f"{p.key}={p.value}\n".encode())
    return h.hexdigest()


class Pass:
    name: ClassVar[str]
    Config: ClassVar[type] = PassConfig
    description: ClassVar[str] = ""  # one line, shown by `rwkv-opt targets NAME`
    in_place: ClassVar[bool] = False  # True: run() edits and returns its input; False: returns a new model

    def __init__(self, config: PassConfig | None = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def configure(cls, overrides: dict | None = None) -> "Pass":
        """This pass with `overrides` applied to its default config; unknown keys and values of the
        wrong kind are refused in one sentence (targets and the CLI pass plain dicts)."""
        overrides = dict(overrides or {})
        known = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise PassRefused(
                f"pass '{cls.name}' has no option '{unknown[0]}'; its options are: "
                f"{', '.join(sorted(known)) or 'none'}."
            )
        try:
            return cls(cls.Config(**overrides))
        except (TypeError, ValueError) as e:
            raise PassRefused(f"pass '{cls.name}': {e}") from None

    def requires(self, model: onnx.ModelProto) -> str | None:
        """Return why this pass cannot run on `model`, or None."""
        return None

    def run(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def ensures(self, model: onnx.ModelProto) -> str | None:
        """Return which invariant the result `model` breaks, or None."""
        return None

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        reason = self.config.problem() or self.requires(model)
        if reason:
            raise PassRefused(f"pass '{self.name}' refused: {reason}")
        before = None if self.in_place else _fingerprint(model)
        res = self.run(model)
        if self.in_place and res.model is not model:
            raise PassBug(f"pass '{self.name}' is declared in-place but returned a new model; a bug in rwkv-opt.")
        if before is not None and (_fingerprint(model) != before or (res.model is model and res.changed)):
            raise PassBug(f"pass '{self.name}' is declared functional but edited its input; a bug in rwkv-opt.")
        broken = self.ensures(res.model)
        if broken:
            raise PassBug(f"pass '{self.name}' broke its postcondition ({broken}); a bug in rwkv-opt.")
        return res

    def config_dict(self) -> dict:
        return {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(self.config).items()}


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if cls.name in REGISTRY:
        raise ValueError(f"pass {cls.name} registered twice")
    REGISTRY[cls.name] = cls
    return cls


# Passes of rwkv_opt.passes.experimental: registered only when asked for (they need onnx-graphsurgeon).
EXPERIMENTAL = ("fuse_token_shift_lerp", "fuse_lora")


def load_builtin() -> dict[str, type[Pass]]:
    """Import every core pass module (each registers its passes) -> the registry. Done on first
    lookup, so `import rwkv_opt.passes.sampling_head` (the runtime's need) imports no other pass."""
    import importlib
    import pkgutil

    import rwkv_opt.passes as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if not m.ispkg and m.name != "base" and not m.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{m.name}")
    return REGISTRY


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name` ("fp16-mixed", the precision's spelling, finds fp16_mixed)."""
    name = name.replace("-", "_")
    if name in EXPERIMENTAL:
        import rwkv_opt.passes.experimental  # noqa: F401  (registers them; one sentence if graphsurgeon is missing)
    elif name not in REGISTRY:
        load_builtin()
    if name not in REGISTRY:
        known = sorted(set(load_builtin()) | set(EXPERIMENTAL))
        raise RwkvOptError(f"unknown pass '{name}'; known passes: {', '.join(known)}.")
    return REGISTRY[name]


def applied_passes(model: onnx.ModelProto) -> list[str]:
    return Meta.of(model).passes


def mark_applied(model: onnx.ModelProto, name: str) -> None:
    set_meta(model, Key.PASSES, ",".join(applied_passes(model) + [name]))
