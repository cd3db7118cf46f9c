"""fuse_wkv: give every per-token WKV Scan a faster form, chosen per call from the sequence length.

    before  r,w,k,v,kk,b (B,T,H,N) ─ Unsqueeze ─┐
            S0 (B,H,N,N) ───────────────────────┴─ Scan[step body] ─┬─ y (B,T,H,N,1) ─ Squeeze ─ y
                                                                    └─ S (B,H,N,N)
    after   T = Shape(r)[1]
            If(T == 1)   then  wkv_step: one direct state update, no Scan
                         else  If(T < min_chunked_len)  then  the original Scan (+ Squeeze)
                                                        else  wkv_chunked: Scan over chunks of `chunk`
                                                              (reads log w directly when w = Exp(x))
            ─┬─ y (B,T,H,N)       the Squeeze is absorbed; consumers read the If's output
             └─ S (B,H,N,N)       same tensor name as before (often a graph output)
    min_chunked_len <= 2: no inner If (every T > 1 takes the chunked form).
    mode = chunked: the chunked form alone, no If (T == 1 then costs a padded chunk).
    mode = step: the direct step alone, no If: a decode-only graph (T must be 1).
    mode = function: each site becomes ONE node  rwkv7.WKV7(r, w, k, v, kk, b, state) -> (y, state')
           (inputs (B,T,H,N) and (B,H,N,N); y (B,T,H,N)), and the model carries an ONNX local function
           of that name whose body is the auto dispatch above (reading w; Log(w) for the chunked
           form). ONNX Runtime inlines the body; a runtime that registers its own WKV7 kernel (a
           custom op in domain "rwkv7") runs that instead, with no change to the model (tested with
           a numpy kernel registered through onnxruntime-extensions).
Measured (WKV alone, H=12, N=64, 1 thread, benchmarks/wkv_prefill.py): the If costs ~5 us per
call; the chunked form (L = 64) overtakes the Scan between T = 16 and 24 and is ~3.5-4x faster
at T = 128-512; the direct step saves ~10-25% of the Scan's T == 1 time. The default chunk is 32 (below).

The Scan is found by structure, not by name: 6 scan inputs along axis 1 and a body that is exactly
    u = S @ kk;  S' = S * w - u * b + v * k;  y = S' @ r          (2 MatMul, 3 Mul, Sub, Add)
with the roles read from the dataflow and the column/row shapes of the body inputs. The new nodes
are named under the Scan's scope (`/blocks.{i}/att/wkv/fused/...`, the original Scan keeps its
name inside the Scan branch), so precision passes can still address the WKV, which stays fp32.
Every branch keeps the graph valid for any batch and T >= 1. Needs opset >= 18 (Pad with axes).
"""

from __future__ import annotations

import dataclasses
import enum
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from rwkv_opt.graph.builder import FLOAT, GraphBuilder, Value
from rwkv_opt.onnx_util import all_graphs, attr, opset, producers
from rwkv_opt.graph.wkv_chunked import check_chunk, wkv_chunked, wkv_step
from rwkv_opt.tensorstore import read_array
from rwkv_opt.passes.base import Pass, PassConfig, PassResult, drop_dead, mark_applied, register

ROLES = ("r", "w", "k", "v", "kk", "b")
COLUMNS = {"r", "v", "kk"}  # body inputs shaped (B,H,N,1); the others are (B,H,1,N)
MIN_OPSET = 18
SHAPE_OPS = {"Reshape", "Unsqueeze", "Squeeze", "Identity"}  # commute with Exp / Log


class FuseMode(str, enum.Enum):
    AUTO = "auto"  # If on T: step (T == 1), original Scan (T < min_chunked_len), chunked
    CHUNKED = "chunked"  # the chunked form for every T
    STEP = "step"  # the direct step alone, no If: a decode-only graph (T must be 1)
    FUNCTION = "function"  # one rwkv7.WKV7 node per site, its body (the AUTO dispatch) an ONNX function


FUNCTION_DOMAIN, FUNCTION_NAME = "rwkv7", "WKV7"
FUNCTION_INPUTS = (*ROLES, "state")


@dataclass(frozen=True)
class FuseWkvConfig(PassConfig):
    # chunk length L of the chunked form (even, <= 64, multiple of 16 above 16). 32: in the whole 0.1B model
    # (Intel Xeon, 2 threads, decode_ab 4 rounds, reports/decode.md session 7) prefill T=128 fp32 1.007x,
    # int8 1.049x, int4 1.020x and T=512 fp32 ~1.02x of L = 64, decode 0.98-1.00x
    chunk: int = 32
    min_chunked_len: int = 32  # shortest T that takes the chunked form; shorter T > 1 keeps the Scan
    mode: FuseMode = FuseMode.AUTO

    def problem(self) -> str | None:
        if not isinstance(self.min_chunked_len, int) or self.min_chunked_len < 1:
            return f"min_chunked_len must be an int >= 1, got {self.min_chunked_len!r}"
        if self.mode not in [m.value for m in FuseMode]:
            return f"mode must be one of {', '.join(m.value for m in FuseMode)}, got {self.mode!r}"
        return check_chunk(self.chunk)


@dataclass(frozen=True)
class WkvScan:
    """A matched WKV Scan: the node, its scan inputs by role, and the head shape."""

    node: onnx.NodeProto
    inputs: dict[str, str]  # role -> outer tensor fed to the Scan ((B,T,H,N,1) or (B,T,H,1,N))
    H: int
    N: int


def find_wkv_scans(graph: onnx.GraphProto) -> list[WkvScan]:
    """Every Scan node of `graph` (top level) whose body is the WKV step."""
    found = []
    for node in graph.node:
        if node.op_type == "Scan" and node.domain in ("", "ai.onnx"):
            m = _match_scan(node)
            if m is not None:
                found.append(m)
    return found


def _match_scan(node: onnx.NodeProto) -> WkvScan | None:
    if attr(node, "num_scan_inputs") != 6 or len(node.input) != 7 or len(node.output) != 2:
        return None
    if list(attr(node, "scan_input_axes", [0] * 6)) != [1] * 6 or list(attr(node, "scan_output_axes", [0])) != [1]:
        return None
    if any(attr(node, k) and any(attr(node, k)) for k in ("scan_input_directions", "scan_output_directions")):
        return None
    body = attr(node, "body")
    roles = _match_body(body)
    if roles is None:
        return None
    dims = [d.dim_value for d in body.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[1] or not dims[2] or dims[2] != dims[3]:
        return None
    return WkvScan(node, {role: node.input[j + 1] for role, j in roles.items()}, dims[1], dims[2])


def _match_body(body: onnx.GraphProto) -> dict[str, int] | None:
    """Role -> scan-input index if `body` is exactly the WKV step, else None."""
    if len(body.input) != 7 or len(body.output) != 2 or len(body.node) != 7:
        return None
    if Counter(n.op_type for n in body.node) != Counter(MatMul=2, Mul=3, Sub=1, Add=1):
        return None
    prod = producers(body)
    idx = {i.name: j - 1 for j, i in enumerate(body.input)}
    S = body.input[0].name
    op = lambda name, t: prod[name] if name in prod and prod[name].op_type == t else None  # noqa: E731
    y, s1 = op(body.output[1].name, "MatMul"), op(body.output[0].name, "Add")
    if y is None or s1 is None or y.input[0] != s1.output[0]:
        return None
    sub = next((op(i, "Sub") for i in s1.input if op(i, "Sub")), None)
    vk = next((op(i, "Mul") for i in s1.input if op(i, "Mul")), None)
    if sub is None or vk is None:
        return None
    sw, ub = op(sub.input[0], "Mul"), op(sub.input[1], "Mul")
    if sw is None or ub is None or S not in sw.input:
        return None
    u = next((op(i, "MatMul") for i in ub.input if op(i, "MatMul")), None)
    if u is None or u.input[0] != S:
        return None
    other = lambda n, x: n.input[1] if n.input[0] == x else n.input[0]  # noqa: E731
    roles = {"r": y.input[1], "kk": u.input[1], "w": other(sw, S), "b": other(ub, u.output[0])}
    is_col = {i.name: _is_column(i) for i in body.input}
    vk_col = [i for i in vk.input if is_col.get(i)]
    if len(vk_col) != 1:
        return None
    roles["v"], roles["k"] = vk_col[0], other(vk, vk_col[0])
    if any(n not in idx or idx[n] < 0 or is_col[n] != (role in COLUMNS) for role, n in roles.items()):
        return None
    if len({roles[r] for r in ROLES}) != 6:
        return None
    return {role: idx[n] for role, n in roles.items()}


def _is_column(vi: onnx.ValueInfoProto) -> bool | None:
    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    if len(dims) != 4:
        return None
    return True if dims[3] == 1 and dims[2] != 1 else False if dims[2] == 1 and dims[3] != 1 else None


class _Scoped(GraphBuilder):
    """A builder for new nodes (main graph or a branch) under one scope. Its constants are its own
    initializers, named under the scope: a branch's constants stay inside the branch, so an If
    does not carry them as outer-scope inputs on every call."""

    def __init__(self, opset: int, scope: str):
        super().__init__(scope.replace("/", "_"), opset)
        self._scope.append(scope)

    def weight(self, name: str, array: np.ndarray, inline: bool = True) -> Value:  # subgraph tensors stay inline
        return super().weight(self.path(name), array, inline=True)

    def branch(self, outputs: list[tuple[Value, str, list]]) -> onnx.GraphProto:
        """This builder as an If branch returning `outputs` (value, name, shape)."""
        for value, name, shape in outputs:
            self.output(value, name, FLOAT, shape)
        return self.graph()


@dataclass
class _Site:
    """What one rewrite needs: the match, the (B,T,H,N) inputs and the names to produce."""

    scan: WkvScan
    prefix: str
    x: dict[str, str]  # role -> (B,T,H,N) tensor
    logw: tuple | None  # (Exp input, shape-only nodes to replay on it) when w = Exp(.)
    y_name: str
    s_name: str


def _names(graph: onnx.GraphProto, acc: set) -> set:
    """Every node, value, input and initializer name in `graph` and its subgraphs, added to `acc`."""
    for g in all_graphs(graph):
        acc.update(i.name for i in g.initializer)
        acc.update(i.name for i in g.input)
        for n in g.node:
            acc.add(n.name)
            acc.update(n.output)
    return acc


def _fresh_prefix(node: onnx.NodeProto, taken: set) -> str:
    parent = node.name.rsplit("/", 1)[0].strip("/") if node.name.startswith("/") else ""
    base = f"{parent}/fused" if parent else "wkv_fused"
    cand, i = base, 0
    while cand in taken or any(t.startswith(f"/{cand}/") for t in taken):
        i += 1
        cand = f"{base}_{i}"
    taken.add(cand)
    return cand


def _axes(graph_consts: dict, node: onnx.NodeProto) -> list[int] | None:
    if len(node.input) > 1 and node.input[1] in graph_consts:
        return [int(a) for a in np.ravel(graph_consts[node.input[1]])]
    axes = attr(node, "axes")
    return list(axes) if axes is not None else None


def _log_decay(prod: dict, w_BTHN: str) -> tuple | None:
    """(x, chain) when w = shape-only ops (or a Cast to fp32, as a precision pass leaves it) applied
    to Exp(x): then log w = the same ops on x."""
    chain, t = [], w_BTHN
    while t in prod and (prod[t].op_type in SHAPE_OPS or prod[t].op_type == "Cast" and attr(prod[t], "to") == FLOAT):
        chain.append(prod[t])
        t = prod[t].input[0]
    if t not in prod or prod[t].op_type != "Exp":
        return None
    return prod[t].input[0], chain[::-1]


def _bthn(scan: WkvScan, role: str, main: _Scoped, prod: dict, consts: dict) -> str:
    """The (B,T,H,N) tensor the Scan input was unsqueezed from, or a new Squeeze of it."""
    t, axes = scan.inputs[role], ([-1], [4]) if role in COLUMNS else ([-2], [3])
    p = prod.get(t)
    if p is not None and p.op_type == "Unsqueeze" and _axes(consts, p) in axes:
        return p.input[0]
    return main.Squeeze(t, main.ints(axes[0][0]))


def _site(graph: onnx.GraphProto, scan: WkvScan, main: _Scoped, prefix: str, prod: dict, consts: dict) -> _Site:
    """Find (or make) the (B,T,H,N) inputs, the log decay and the names the rewrite must produce.
    The Squeeze that turns the Scan's (B,T,H,N,1) y into (B,T,H,N) is absorbed when it is y's
    only reader; then the new y takes the Squeeze's output name."""
    x = {role: _bthn(scan, role, main, prod, consts) for role in ROLES}
    y5 = scan.node.output[1]
    users = [n for n in graph.node if y5 in n.input]
    absorb = (
        len(users) == 1
        and users[0].op_type == "Squeeze"
        and _axes(consts, users[0]) in ([-1], [4])
        and y5 not in {o.name for o in graph.output}
    )
    y_name = users[0].output[0] if absorb else _unabsorbed_y(prefix)
    return _Site(scan, prefix, x, _log_decay(prod, x["w"]), y_name, scan.node.output[0])


def _step_branch(opset: int, site: _Site) -> onnx.GraphProto:
    b, sc, x = _Scoped(opset, f"{site.prefix}/step"), site.scan, site.x
    y, s = wkv_step(b, sc.H, sc.N, *(x[r] for r in ROLES), sc.node.input[0])
    return b.branch(
        [(y, f"/{site.prefix}/step/y", [None, 1, sc.H, sc.N]), (s, f"/{site.prefix}/step/s", [None, sc.H, sc.N, sc.N])]
    )


def _scan_branch(opset: int, site: _Site) -> onnx.GraphProto:
    """The original Scan, unchanged (same name, same body), plus the Squeeze it fed. Its 5-D scan
    inputs are made inside the branch from the (B,T,H,N) tensors, so calls that take another
    branch (every decode step) do not run the six Unsqueezes."""
    b, sc = _Scoped(opset, f"{site.prefix}/scan"), site.scan
    attrs = {a.name: helper.get_attribute_value(a) for a in sc.node.attribute}
    xs = [b.Unsqueeze(site.x[r], b.ints(-1 if r in COLUMNS else -2)) for r in ROLES]
    roles = dict(zip(ROLES, xs))
    order = {t: r for r, t in sc.inputs.items()}
    s, y5 = b.op("Scan", sc.node.input[0], *(roles[order[t]] for t in sc.node.input[1:]), outputs=2, **attrs)
    b.nodes[-1].name = sc.node.name
    y = b.Squeeze(y5, b.ints(-1))
    return b.branch(
        [
            (y, f"/{site.prefix}/scan/y", [None, None, sc.H, sc.N]),
            (s, f"/{site.prefix}/scan/s", [None, sc.H, sc.N, sc.N]),
        ]
    )


def _chunked(b: GraphBuilder, site: _Site, chunk: int) -> tuple[Value, Value]:
    """wkv_chunked on the site's inputs, fed log w (the shape ops replayed on Exp's input) if known."""
    sc, x, logw = site.scan, site.x, None
    if site.logw is not None:
        logw, chain = site.logw
        for n in chain:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            logw = b.op(n.op_type, logw, *n.input[1:], **attrs)
    return wkv_chunked(b, sc.H, sc.N, *(x[r] for r in ROLES), sc.node.input[0], chunk=chunk, logw=logw)


def _chunked_branch(opset: int, site: _Site, chunk: int) -> onnx.GraphProto:
    b, sc = _Scoped(opset, f"{site.prefix}/chunked"), site.scan
    y, s = _chunked(b, site, chunk)
    return b.branch(
        [
            (y, f"/{site.prefix}/chunked/y", [None, None, sc.H, sc.N]),
            (s, f"/{site.prefix}/chunked/s", [None, sc.H, sc.N, sc.N]),
        ]
    )


def _dispatch(main: _Scoped, opset: int, site: _Site, cfg: FuseWkvConfig) -> tuple[Value, Value]:
    """The If tree on T = Shape(r)[1] (see the module docstring) -> (y, s)."""
    sc = site.scan
    # T from the (B,T,H,N) r the Scan reads (Shape is dtype-neutral: precision passes leave it)
    T = main.Shape(site.x["r"], start=1, end=2)  # (1,) int64
    longer = _chunked_branch(opset, site, cfg.chunk)
    if cfg.min_chunked_len > 2:
        inner = _Scoped(opset, f"{site.prefix}/multi")
        short = main.Less(T, main.ints(cfg.min_chunked_len))
        y, s = inner.If(short, then_branch=_scan_branch(opset, site), else_branch=longer, outputs=2)
        longer = inner.branch(
            [
                (y, f"/{site.prefix}/multi/y", [None, None, sc.H, sc.N]),
                (s, f"/{site.prefix}/multi/s", [None, sc.H, sc.N, sc.N]),
            ]
        )
    one = main.Equal(T, main.ints(1))
    return main.If(one, then_branch=_step_branch(opset, site), else_branch=longer, outputs=2)


def _rewrite(
    graph: onnx.GraphProto, scan: WkvScan, opset: int, taken: set, cfg: FuseWkvConfig, prod: dict, consts: dict
) -> tuple[list, list, _Site]:
    """The nodes (and their initializers) that replace `scan`; they produce its state output and y
    under the site's names."""
    prefix = _fresh_prefix(scan.node, taken)
    main = _Scoped(opset, prefix)
    site = _site(graph, scan, main, prefix, prod, consts)
    if FuseMode(cfg.mode) is FuseMode.FUNCTION:
        y, s = main.op(
            FUNCTION_NAME,
            *(site.x[r] for r in ROLES),
            scan.node.input[0],
            outputs=2,
            domain=FUNCTION_DOMAIN,
            name=FUNCTION_NAME,
        )
    elif FuseMode(cfg.mode) is FuseMode.CHUNKED:
        y, s = _chunked(main, site, cfg.chunk)
    elif FuseMode(cfg.mode) is FuseMode.STEP:
        sc = site.scan
        y, s = wkv_step(main, sc.H, sc.N, *(site.x[r] for r in ROLES), sc.node.input[0])
    else:
        y, s = _dispatch(main, opset, site, cfg)
    main.output(s, site.s_name, FLOAT, None)
    main.output(y, site.y_name, FLOAT, None)
    if site.y_name == _unabsorbed_y(site.prefix):  # y's other readers get the 5-D tensor they had
        main.nodes.append(
            helper.make_node(
                "Unsqueeze", [site.y_name, main.ints(-1)], [scan.node.output[1]], name=f"/{prefix}/Unsqueeze_y"
            )
        )
    return main.nodes, list(main.initializers.values()), site


def wkv7_function(opset: int, scan: WkvScan, cfg: FuseWkvConfig) -> onnx.FunctionProto:
    """rwkv7.WKV7 as an ONNX local function: the AUTO dispatch on the function's own inputs (every
    constant a Constant node: functions hold no initializers), the Scan branch using `scan`'s body."""
    tmpl = onnx.NodeProto()
    tmpl.CopyFrom(scan.node)
    del tmpl.input[:], tmpl.output[:]
    five_d = {role: f"{role}_5d" for role in ROLES}
    idx = {t: r for r, t in scan.inputs.items()}
    tmpl.input.extend(["state", *(five_d[idx[t]] for t in scan.node.input[1:])])
    tmpl.output.extend(["s_scan", "y_scan"])
    site = _Site(WkvScan(tmpl, five_d, scan.H, scan.N), FUNCTION_NAME, {r: r for r in ROLES}, None, "y", "state_out")
    b = _Scoped(opset, FUNCTION_NAME)
    y, st = _dispatch(b, opset, site, dataclasses.replace(cfg, mode=FuseMode.AUTO))
    consts = [helper.make_node("Constant", [], [name], value=t) for name, t in b.initializers.items()]
    rename = {y: "y", st: "state_out"}
    body = consts + list(b.nodes)
    for n in body:
        n.output[:] = [rename.get(o, o) for o in n.output]
    return helper.make_function(
        FUNCTION_DOMAIN,
        FUNCTION_NAME,
        list(FUNCTION_INPUTS),
        ["y", "state_out"],
        body,
        opset_imports=[helper.make_opsetid("", opset)],
    )


def _splice(g: onnx.GraphProto, plans: dict) -> list[_Site]:
    """Put each plan's nodes where its Scan was (so the node list stays topologically sorted),
    drop the absorbed Squeezes and the value_info of tensors that no longer exist."""
    sites = [site for _, _, site in plans.values()]
    absorbed = {s.y_name for s in sites if s.y_name != _unabsorbed_y(s.prefix)}
    new = []
    for n in g.node:
        if n.op_type == "Scan" and n.output[0] in plans:
            new.extend(plans[n.output[0]][0])
        elif not (n.op_type == "Squeeze" and n.output[0] in absorbed):
            new.append(onnx.NodeProto())
            new[-1].CopyFrom(n)
    del g.node[:]
    g.node.extend(new)
    g.initializer.extend(i for _, inits, _ in plans.values() for i in inits)
    drop_dead(g)  # the Unsqueezes that fed the Scans (the Scan branch makes its own), their
    # constants, and the value_info of the Scans' 5-D y
    return sites


def _unabsorbed_y(prefix: str) -> str:
    """The new y's name when the Scan's Squeeze could not be absorbed."""
    return f"/{prefix}/y_BTHN"


@register
class FuseWkv(Pass):
    name = "fuse_wkv"
    Config = FuseWkvConfig
    description = "Per call: direct WKV step for T == 1, the Scan for short T, the chunked WKV for long T."

    def requires(self, model: onnx.ModelProto) -> str | None:
        if (version := opset(model)) < MIN_OPSET:
            return f"the model's opset {version} is below {MIN_OPSET} (the chunked WKV pads with Pad axes)"
        if not find_wkv_scans(model.graph):
            return "no WKV Scan found"
        return None

    def run(self, model: onnx.ModelProto) -> PassResult:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        taken = _names(g, set())
        version = opset(out)
        prod = producers(g)
        consts = {i.name: read_array(i) for i in g.initializer if i.data_type == onnx.TensorProto.INT64}
        plans = {
            scan.node.output[0]: _rewrite(g, scan, version, taken, self.config, prod, consts)
            for scan in find_wkv_scans(g)
        }
        sites = _splice(g, plans)
        if FuseMode(self.config.mode) is FuseMode.FUNCTION:
            out.functions.append(wkv7_function(version, sites[0].scan, self.config))
            out.opset_import.append(helper.make_opsetid(FUNCTION_DOMAIN, 1))
        mark_applied(out, self.name)
        notes = [
            f"fused {len(sites)} WKV Scan(s) (mode {FuseMode(self.config.mode).value}, chunk "
            f"{self.config.chunk}, min_chunked_len {self.config.min_chunked_len}) under "
            f"{', '.join('/' + s.prefix for s in sites)}",
            f"log decay read before its Exp in {sum(s.logw is not None for s in sites)} of {len(sites)}",
        ]
        return PassResult(out, True, notes)
