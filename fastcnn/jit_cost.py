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


class CompileNotice:
    """Says on stderr what a slow first batch is doing: compiling Numba's kernels.

    Started just before a run's first batch on the numba backend; if that batch is still running
    after ``after_s`` seconds (a cached start takes well under one), it prints once that the
    kernels are being compiled for this CPU, once per install, and when the batch ends, how long
    it took. ``write`` is where lines go (tqdm.write under a progress bar)."""

    def __init__(self, enabled=True, after_s=2.0, write=None):
        import sys
        import threading
        import time

        self._time = time.perf_counter
        self._write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self._timer = threading.Timer(after_s, self._say) if enabled else None
        self._said = False
        self._start = None

    def _say(self):
        self._said = True
        self._write("fastcnn: compiling the numba kernels for this CPU (the first run after an "
                    "install or upgrade; later runs load them from Numba's cache) ...")

    def __enter__(self):
        self._start = self._time()
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc):
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        if self._said and exc[0] is None:
            self._write(f"fastcnn: compiled in {self._time() - self._start:.1f} s")
