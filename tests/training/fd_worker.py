"""Central finite differences of the float64 numpy reference loss, in its own process.

Run with single-threaded BLAS (the caller sets OPENBLAS_NUM_THREADS=1): the reference's matmuls
are tiny, and a threaded BLAS makes each forward ~6x slower. Usage: python fd_worker.py IN.npz OUT.npz
IN holds `sd/<key>` (checkpoint-layout float64 tensors), x, mask, optional reward, h, and
`probe_keys` / `probe_index` (checkpoint key, flat index) pairs. OUT: loss, fd (one per probe).
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from rwkv_opt.checkpoint.weights import from_state_dict  # noqa: E402
from train_helpers import reference_loss  # noqa: E402

src, dst = sys.argv[1:3]
z = np.load(src)
sd = {k[3:]: z[k].copy() for k in z.files if k.startswith("sd/")}
x, mask, h = z["x"], z["mask"], float(z["h"])
reward = z["reward"] if "reward" in z.files else None


def loss():
    return reference_loss(from_state_dict(sd), x, mask, reward)


fds = []
for key, fi in zip(z["probe_keys"], z["probe_index"]):
    a = sd[str(key)].reshape(-1)
    old = a[fi]
    a[fi] = old + h
    lp = loss()
    a[fi] = old - h
    lm = loss()
    a[fi] = old
    fds.append((lp - lm) / (2 * h))
np.savez(dst, loss=loss(), fd=np.asarray(fds))
