"""Training as a user runs it: `ConvNet.fit` epochs against a plain PyTorch loop, one process.

    python bench/fit_vs_torch.py                      # complex model, batch 64 and 10
    python bench/fit_vs_torch.py --batch 64 --rounds 5 --images 1920
    python bench/fit_vs_torch.py --model resnet --shape 3x32x32 --batch 64   # random images

Each round trains one epoch of --images images on each side, taking turns: fastcnn through
`ConvNet.fit` with its own thread choice (the tuner, as `fastcnn train` runs), PyTorch through
the loop a user writes (pre-scaled float32 tensors; `zero_grad`, forward, `cross_entropy`,
`backward`, SGD `step`) with PyTorch's default threads. Both models start from the same weights;
the speeds are img/s of each epoch's wall time, the ratio that of the medians. An epoch of
1,920 images takes about a second on 2 cores: short fits are where probing for a thread count
costs most. Needs `pip install torch==2.13.0`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fastcnn import datasets, models
from fastcnn.bench_worker import copy_weights, torch_model


def fastcnn_epoch(net, x, y, batch):
    start = time.perf_counter()
    net.fit(x, y, epochs=1, batch_size=batch, lr=0.01, verbose=False)
    return len(x) / (time.perf_counter() - start)


def torch_epoch(tnet, opt, xt, yt, batch):
    start = time.perf_counter()
    for s in range(0, len(xt), batch):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(tnet(xt[s : s + batch]), yt[s : s + batch]).backward()
        opt.step()
    return len(xt) / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="complex", choices=models.MODELS)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 10])
    p.add_argument("--images", type=int, default=1920)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dataset", default="mnist-sample", choices=datasets.NAMES)
    p.add_argument("--shape", help="CxHxW: random uint8 images of this shape instead of the "
                   "dataset's (3x32x32: CIFAR-10's)")
    args = p.parse_args()
    if args.shape:
        shape = tuple(int(v) for v in args.shape.lower().split("x"))
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (args.images,) + shape, dtype=np.uint8)
        y = rng.integers(0, 10, args.images)
    else:
        (x, y), _ = datasets.load(args.dataset, raw=True)
        x, y = x[: args.images], y[: args.images]
    xt = torch.from_numpy(x).float().div_(255)
    yt = torch.from_numpy(y.astype(np.int64))
    shape = "x".join(map(str, x.shape[1:]))
    print(f"{args.model} model, {len(x)} images of {shape} an epoch, {args.rounds} rounds, "
          f"PyTorch {torch.__version__} on {torch.get_num_threads()} threads")
    for batch in args.batch:
        net = models.build(args.model, input_shape=x.shape[1:])
        tnet = torch_model(args.model, input_shape=x.shape[1:])
        copy_weights(net, tnet)
        opt = torch.optim.SGD(tnet.parameters(), lr=0.01)
        fastcnn_epoch(net, x[: 4 * batch], y[: 4 * batch], batch)  # compiled, warmed up
        torch_epoch(tnet, opt, xt[: 4 * batch], yt[: 4 * batch], batch)
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(fastcnn_epoch(net, x, y, batch))
            theirs.append(torch_epoch(tnet, opt, xt, yt, batch))
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"batch {batch}: fastcnn fit {', '.join(f'{v:,.0f}' for v in ours)} img/s; "
              f"PyTorch loop {', '.join(f'{v:,.0f}' for v in theirs)}; "
              f"median ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
