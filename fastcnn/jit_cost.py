"""What Numba's compiler costs a training run: the time to the end of the first batch, from a
cold cache (every kernel compiled) and from a warm one (kernels loaded from Numba's cache).

Each start is a fresh Python process, so nothing is shared with the caller; the cache lives in a
temporary NUMBA_CACHE_DIR, so a cold start is really cold and the user's cache is not touched.
"""

from __future__ import annotations

import json
import subprocess
import tempfile

from . import spawn

_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import fastcnn
from fastcnn import models
imported = time.perf_counter()
model, batch, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fastcnn.set_backend(backend)
net = models.build(model)
x = np.random.default_rng(0).random((batch, 1, 28, 28), dtype=np.float32)
y = np.arange(batch) % 10
opt = fastcnn.SGD(0.05)
start = time.perf_counter()
net.train_step(x, y, opt)
first = time.perf_counter()
for _ in range(5):
    net.train_step(x, y, opt)
steady = (time.perf_counter() - first) / 5
print(json.dumps({"import_s": imported - t0, "first_batch_s": first - start,
                  "steady_batch_s": steady, "to_first_batch_s": first - t0}))
"""


def start_once(model="simple", batch_size=10, backend="numba", cache_dir=None):
    """Run one training start in a new process; returns its timings in seconds."""
    env = spawn.environment()
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    run = subprocess.run(spawn.python_code(_PROBE, model, str(batch_size), backend),
                         capture_output=True, text=True, env=env, timeout=900)
    if run.returncode != 0:
        raise RuntimeError(f"the start-up probe failed: {run.stderr.strip()[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def cold_and_cached(model="simple", batch_size=10):
    """{"cold": timings, "cached": timings} for the numba backend, in a throwaway cache."""
    with tempfile.TemporaryDirectory(prefix="fastcnn-jit-") as cache:
        cold = start_once(model, batch_size, "numba", cache)
        cached = start_once(model, batch_size, "numba", cache)
    for t in (cold, cached):
        t["compile_s"] = max(t["first_batch_s"] - t["steady_batch_s"], 0.0)
    return {"cold": cold, "cached": cached}
