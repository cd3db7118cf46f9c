"""The base fp32 graph against the numpy reference: sequence, token by token, two chunks;
batch 1 and 3 with different prompts; logits for all positions or the last only."""

import numpy as np
import onnx
import pytest

from rwkv_testutil import ort_session, zero_feed
from rwkv_opt.graph import contract
from rwkv_opt.graph.model import BuildOptions, LogitsMode, build_model
from rwkv_opt.reference import ReferenceModel

TOL = 1e-4


def rel(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max() / np.std(b)


def run(sess, cfg, tokens, feed):
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, {"x": tokens, **feed})))
    return out, {dst: out[src] for src, dst in contract.state_feedback(cfg.n_layer).items()}


@pytest.fixture(scope="module")
def built(tiny_weights):
    m = build_model(tiny_weights)
    onnx.checker.check_model(m, full_check=True)
    return tiny_weights, ort_session(m, optimize=False), ReferenceModel(tiny_weights)


@pytest.mark.parametrize("batch", [1, 3])
def test_sequence_tokens_and_chunks(built, batch):
    w, sess, ref = built
    cfg = w.config
    tokens = np.random.default_rng(batch).integers(0, cfg.vocab, (batch, 64))
    want, wst = ref.forward(tokens)

    out, st = run(sess, cfg, tokens, zero_feed(cfg, batch))
    assert rel(out["head"], want) <= TOL
    assert (out["head"].argmax(-1) == want.argmax(-1)).all()
    for i in range(cfg.n_layer):
        assert rel(out[f"wkv_next_{i}"], wst.wkv[i]) <= TOL
        assert rel(out[f"x_tmix_next_{i}"][:, 0], wst.att[i]) <= TOL
        assert rel(out[f"x_cmix_next_{i}"][:, 0], wst.ffn[i]) <= TOL

    feed, outs = zero_feed(cfg, batch), []
    for t in range(tokens.shape[1]):
        o, feed = run(sess, cfg, tokens[:, t : t + 1], feed)
        outs.append(o["head"])
    assert rel(np.concatenate(outs, 1), want) <= TOL
    assert rel(feed["wkv_state_1"], wst.wkv[1]) <= TOL

    o1, feed = run(sess, cfg, tokens[:, :29], zero_feed(cfg, batch))
    o2, feed = run(sess, cfg, tokens[:, 29:], feed)
    assert rel(np.concatenate([o1["head"], o2["head"]], 1), want) <= TOL
    assert rel(feed["wkv_state_0"], wst.wkv[0]) <= TOL


@pytest.mark.parametrize("T", [1, 2, 4, 70])
def test_last_logits_mode(tiny_weights, T):
    """Logits "last": the last block runs everything after its WKV on the last two positions (Scope.TAIL);
    the logits and every state output still match the reference, for T = 1 (one position), 2 (exactly
    two) and longer prompts (7 and 7a: DeepEmbed's token Gather is cut too); a chain of calls carries on."""
    cfg = tiny_weights.config
    m = build_model(tiny_weights, BuildOptions(logits=LogitsMode.LAST))
    assert any("/tail/" in n.name for n in m.graph.node)
    sess = ort_session(m)
    tokens = np.random.default_rng(T).integers(0, cfg.vocab, (2, T))
    out, st = run(sess, cfg, tokens, zero_feed(cfg, 2))
    ref = ReferenceModel(tiny_weights)
    want, wst = ref.forward(tokens)
    assert out["head"].shape == (2, 1, cfg.vocab)
    assert rel(out["head"], want[:, -1:]) <= TOL
    for i in range(cfg.n_layer):
        assert rel(out[f"wkv_next_{i}"], wst.wkv[i]) <= TOL
        assert rel(out[f"x_tmix_next_{i}"][:, 0], wst.att[i]) <= TOL
        assert rel(out[f"x_cmix_next_{i}"][:, 0], wst.ffn[i]) <= TOL
    more = np.random.default_rng(T + 1).integers(0, cfg.vocab, (2, 3))
    out2, _ = run(sess, cfg, more, st)
    want2, _ = ref.forward(np.concatenate([tokens, more], 1))
    assert rel(out2["head"], want2[:, -1:]) <= TOL


def test_contract_io_and_metadata(tiny7):
    m = build_model(tiny7)
    ins = [i.name for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    assert ins[0] == "x" and outs[0] == "head"
    for i in range(tiny7.config.n_layer):
        assert set(contract.state_inputs(i)) <= set(ins)
        assert set(contract.state_outputs(i)) <= set(outs)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["rwkv_opt.n_layer"] == "2" and meta["rwkv_opt.variant"] == "rwkv7"
    assert all(k in meta for k in contract.META_KEYS)
    # no Transpose of a weight at run time: linears are stored [in, out]
    assert not [n for n in m.graph.node if n.op_type == "Transpose"]
    assert all(n.name.startswith("/") for n in m.graph.node)
    assert any(n.name.startswith("/blocks.1/att/wkv/") for n in m.graph.node)


def test_key_order_does_not_matter(tiny7):
    """Keys looked up by name: a shuffled state dict gives the same graph weights."""
    from rwkv_opt.checkpoint.weights import from_state_dict

    items = list(tiny7.raw.items())
    np.random.default_rng(0).shuffle(items)
    shuffled = from_state_dict(dict(items))
    a = {t.name: t.raw_data for t in build_model(tiny7).graph.initializer}
    b = {t.name: t.raw_data for t in build_model(shuffled).graph.initializer}
    assert a == b


def test_every_scope_the_passes_read_exists(tiny_weights):
    """Node scopes are an API: renaming one in the builder (say `decay`) would silently send that path
    to fp16 and int4. Every scope constant names nodes of the base graph (DeepEmbed only in 7a), and
    every path or glob the passes match by (precision, quantize, truncate) finds nodes in it."""
    import fnmatch

    from rwkv_opt.graph.contract import Scope, scope_path
    from rwkv_opt.graph.truncate import _BLOCK
    from rwkv_opt.passes._convert import WKV_SCOPE
    from rwkv_opt.passes._precision import MIXED_SCOPES
    from rwkv_opt.passes.quantize import DEFAULT_EXCLUDE

    g = build_model(tiny_weights).graph
    names = [n.name for n in g.node]
    names += [n.name for n in g.node for a in n.attribute if a.g.node for n in a.g.node]  # the Scan bodies
    names += [n.name for n in build_model(tiny_weights, BuildOptions(logits=LogitsMode.LAST)).graph.node]  # TAIL
    deepembed = tiny_weights.config.variant.value != "rwkv7"
    for attr, value in vars(Scope).items():
        if attr.startswith("_") or (value == Scope.DEEPEMBED and not deepembed):
            continue
        part = value.format(i=0)
        assert any(f"/{part}/" in n or n == f"/{part}" for n in names), f"Scope.{attr} ({value!r}) names no node"
    for path in (*MIXED_SCOPES, WKV_SCOPE, scope_path(Scope.HEAD)):
        assert any(path in n for n in names), path
    for glob in DEFAULT_EXCLUDE:
        if "deepembed" in glob and not deepembed:
            continue
        assert any(fnmatch.fnmatchcase(n, glob) for n in names), glob
    layers = {int(m.group(1)) for n in names if (m := _BLOCK.match(n))}
    assert layers == set(range(tiny_weights.config.n_layer))
