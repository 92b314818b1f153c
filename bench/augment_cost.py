"""What augmentation adds to a training step: ``ConvNet.fit`` with and without ``augment``,
taking turns, on random images (the cost does not depend on what the pictures show).

    python bench/augment_cost.py                  # simple b10 (crop=2) and 3x32x32 ResNet b64
    python bench/augment_cost.py --rounds 3 --images 0.5

Each row: the median time per step without and with augmentation, and the median of the
rounds' ratios - 1 (the share a step gains). One process; numba backend.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

CASES = (("simple", (1, 28, 28), 10, "crop=2", 3000), ("resnet", (3, 32, 32), 64, "crop,flip", 640))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=float, default=1.0,
                   help="a fraction of each case's images (a quick check: 0.05)")
    args = p.parse_args()
    from fastcnn import backend, models, threads
    from fastcnn.cli import _cpu_model

    backend.set_backend("numba")
    print(f"{_cpu_model()}, {threads.available_cores()} cores")
    for name, shape, batch, spec, n in CASES:
        n = max(2 * batch, int(n * args.images) // batch * batch)
        net = models.build(name, input_shape=shape)
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
        y = rng.integers(0, 10, n)
        net.fit(x[: 2 * batch], y[: 2 * batch], batch_size=batch, verbose=False, augment=spec)
        times = {None: [], spec: []}
        for _ in range(args.rounds):
            for augment in (None, spec):
                start = time.perf_counter()
                net.fit(x, y, batch_size=batch, verbose=False, augment=augment, seed=1)
                times[augment].append((time.perf_counter() - start) / (n // batch))
        plain, augmented = (np.median(times[k]) for k in (None, spec))
        extra = np.median([a / b - 1 for a, b in zip(times[spec], times[None], strict=True)])
        print(f"{name} {'x'.join(map(str, shape))} batch {batch} augment {spec}: "
              f"{plain * 1e3:.3f} ms a step without, {augmented * 1e3:.3f} ms with: "
              f"{extra:+.1%}")


if __name__ == "__main__":
    main()
