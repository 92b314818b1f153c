"""Time one training step (forward, backward, SGD) of a model in this process.

    python bench/step_time.py [--model simple] [--batch 10] [--retain-freed-memory]

Prints the fastest and the median of 10 windows of about 0.3 s each. With --retain-freed-memory
the process first calls fastcnn.memory.retain_freed_memory(), as the CLI does: run it with and
without, one after the other, to see what that costs or saves on your machine.
"""

import argparse
import time

import numpy as np

import fastcnn
from fastcnn import memory, models


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="simple", choices=models.MODELS)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--backend", default="numba")
    p.add_argument("--retain-freed-memory", action="store_true")
    args = p.parse_args()
    if args.retain_freed_memory:
        memory.retain_freed_memory()
    fastcnn.set_backend(args.backend)
    net = models.build(args.model)
    x = np.random.default_rng(0).random((args.batch, 1, 28, 28), dtype=np.float32)
    y = np.arange(args.batch) % 10
    opt = fastcnn.SGD(0.01)
    for _ in range(5):  # compile or load the kernels, warm the caches
        net.train_step(x, y, opt)
    start = time.perf_counter()
    net.train_step(x, y, opt)
    per_window = max(1, int(0.3 / (time.perf_counter() - start)))
    windows = []
    for _ in range(10):
        start = time.perf_counter()
        for _ in range(per_window):
            net.train_step(x, y, opt)
        windows.append((time.perf_counter() - start) / per_window)
    windows.sort()
    print(f"{args.model} batch {args.batch} on {args.backend}, retain freed memory "
          f"{args.retain_freed_memory}: fastest {windows[0] * 1e3:.2f} ms a step "
          f"({args.batch / windows[0]:,.0f} img/s), median {windows[5] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
