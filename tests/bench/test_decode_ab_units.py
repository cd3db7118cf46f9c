"""benchmarks/decode_ab.py's variant parsing: ORT accepts any session config key and ignores unknown ones, so
a misspelt key must be refused before a run that would A/B nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import decode_ab  # noqa: E402


def test_known_and_our_keys_parse():
    name, art, entries = decode_ab.parse_variant("fp32+dbb=/a/b@session.dynamic_block_base=4@rwkv_opt.stepper=0")
    assert (name, art, entries) == ("fp32+dbb", "/a/b", {"session.dynamic_block_base": "4", "rwkv_opt.stepper": "0"})
    assert decode_ab.parse_variant("x=/a") == ("x", "/a", {})
    assert decode_ab.ort_knows("session.disable_prepacking") and decode_ab.ort_knows("session.intra_op.allow_spinning")


@pytest.mark.parametrize(
    "spec, says",
    [
        ("x=/a@session.intra_op.dynamic_block_base=4", "knows no session config entry 'session.intra_op"),
        ("x=/a@session.disable_prepacking", "is not NAME=ARTIFACT[@key=value...]"),
        ("=/a", "is not NAME=ARTIFACT"),
    ],
)
def test_a_key_ort_would_ignore_is_refused(spec, says):
    with pytest.raises(SystemExit) as e:
        decode_ab.parse_variant(spec)
    assert says in str(e.value)
