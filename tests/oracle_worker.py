"""Runs BlinkDL's official `rwkv` package (the oracle) in its own process.

The package reads RWKV_V7_ON / RWKV_DE_VERSION when it is imported, so RWKV-7 and RWKV-7a
need separate processes. Usage: python oracle_worker.py CKPT.pth TOKENS.npy DEEPEMBED(0|1) OUT.npz [SPLIT]
For each row of TOKENS (B,T): logits of the whole sequence (full_output), token by token, and
in two chunks split at SPLIT; plus the final state of each mode.
"""

import os
import sys

import numpy as np

ckpt, tokens_path, deep, out = sys.argv[1:5]
split = int(sys.argv[5]) if len(sys.argv) > 5 else None
os.environ["RWKV_V7_ON"] = "1"
if deep == "1":
    os.environ["RWKV_DE_VERSION"] = "1"
import torch  # noqa: E402

torch.set_num_threads(2)
from rwkv.model import RWKV  # noqa: E402

model = RWKV(model=ckpt[:-4] if ckpt.endswith(".pth") else ckpt, strategy="cpu fp32")
tokens = np.load(tokens_path)
res = {}


def flat_state(st):
    L = len(st) // 3
    return (
        np.stack([st[3 * i].numpy() for i in range(L)]),
        np.stack([st[3 * i + 1].numpy() for i in range(L)]),
        np.stack([st[3 * i + 2].numpy() for i in range(L)]),
    )


with torch.no_grad():
    for b, row in enumerate(tokens):
        row = [int(t) for t in row]
        lo, st = model.forward(row, None, full_output=True)
        res[f"seq_{b}"] = lo.numpy()
        res[f"seq_att_{b}"], res[f"seq_wkv_{b}"], res[f"seq_ffn_{b}"] = flat_state(st)
        st, outs = None, []
        for t in row:
            lo, st = model.forward([t], st)
            outs.append(lo.numpy())
        res[f"tok_{b}"] = np.stack(outs)
        res[f"tok_wkv_{b}"] = flat_state(st)[1]
        if split:
            lo1, st = model.forward(row[:split], None, full_output=True)
            lo2, st = model.forward(row[split:], [s.clone() for s in st], full_output=True)
            res[f"chunk_{b}"] = np.concatenate([lo1.numpy(), lo2.numpy()])
            res[f"chunk_wkv_{b}"] = flat_state(st)[1]
np.savez(out, **res)
