"""The Pass protocol and registry.

A pass is a small named unit: a frozen config dataclass, `requires` (passes that must have
run before it, checked by the pipeline), a precondition (`check`, which returns a reason to
refuse or None), and `run(model) -> PassResult`. It reports honestly whether it changed the
model. Passes register under a stable name; targets and CLI choices come from the registry.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import onnx

from rwkv_opt.errors import RwkvOptError


@dataclass
class PassResult:
    model: onnx.ModelProto
    changed: bool
    notes: list[str] = field(default_factory=list)


class PassRefused(RwkvOptError):
    """A pass's precondition does not hold for this model."""


@dataclass(frozen=True)
class PassConfig:
    """Base for pass configs (frozen, typed, with defaults)."""


class Pass:
    name: ClassVar[str]
    Config: ClassVar[type] = PassConfig
    requires: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def __init__(self, config: PassConfig | None = None):
        self.config = config if config is not None else self.Config()

    def check(self, model: onnx.ModelProto) -> str | None:
        """Return why this pass cannot run on `model`, or None."""
        return None

    def run(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        reason = self.check(model)
        if reason:
            raise PassRefused(f"pass '{self.name}' refused: {reason}")
        return self.run(model)

    def config_dict(self) -> dict:
        return {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(self.config).items()}


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if cls.name in REGISTRY:
        raise ValueError(f"pass {cls.name} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    import rwkv_opt.passes  # noqa: F401  (registers the built-in passes)

    if name not in REGISTRY:
        raise RwkvOptError(f"unknown pass '{name}'; known passes: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[name]


def applied_passes(model: onnx.ModelProto) -> list[str]:
    for p in model.metadata_props:
        if p.key == "rwkv_opt.passes":
            return [s for s in p.value.split(",") if s]
    return []


def mark_applied(model: onnx.ModelProto, name: str) -> None:
    done = applied_passes(model) + [name]
    for p in model.metadata_props:
        if p.key == "rwkv_opt.passes":
            p.value = ",".join(done)
            return
    model.metadata_props.add(key="rwkv_opt.passes", value=",".join(done))


def set_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def get_meta(model: onnx.ModelProto, key: str, default: str | None = None) -> str | None:
    for p in model.metadata_props:
        if p.key == key:
            return p.value
    return default


def fresh_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first not in `taken`, which then holds it."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name `graph` reads: node inputs, graph outputs, and the same inside subgraphs
    (which may capture outer-scope names)."""
    out = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for a in (a for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH):
        out |= names_read(a.g)
    return out


def drop_dead(graph: onnx.GraphProto) -> int:
    """Remove nodes none of whose outputs is read (ONNX ops are pure), until none is left; then,
    if any went, the initializers nothing reads any more; and always the value_info of tensors
    nothing produces. -> number of nodes removed."""
    removed, read = 0, names_read(graph)
    while dead := [n for n in graph.node if not any(o in read for o in n.output)]:
        for n in dead:
            graph.node.remove(n)
        removed += len(dead)
        read = names_read(graph)
    inputs = {i.name for i in graph.input}   # an input's default value stays
    if removed:
        for t in [t for t in graph.initializer if t.name not in read and t.name not in inputs]:
            graph.initializer.remove(t)
    made = {o for n in graph.node for o in n.output} | inputs
    for vi in [vi for vi in graph.value_info if vi.name not in made]:
        graph.value_info.remove(vi)
    return removed
