"""The PyTorch counterpart of `fastcnn train`, for comparing peak memory and time on one job.

    /usr/bin/time -v python bench/torch_train.py --model complex --dataset fashion-mnist
    /usr/bin/time -v fastcnn train --model complex --dataset fashion-mnist

Same data (read by fastcnn's IDX reader, kept as uint8, scaled per batch), same architecture,
plain SGD on the mean cross-entropy, batch 10, lr 0.05; then the test accuracy at batch 256.
Takes the same --epochs / --limit / --threads as `fastcnn train`. Needs `pip install torch==2.13.0`.
"""

import argparse
import time

import numpy as np
import torch

from fastcnn import datasets
from fastcnn.bench_worker import torch_model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="simple", choices=("simple", "complex"))
    p.add_argument("--dataset", default="mnist-sample", choices=datasets.NAMES)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--limit", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    (x, y), (xt, yt) = datasets.load(args.dataset, raw=True)
    x, y = x[: args.limit], y[: args.limit]
    net = torch_model(args.model)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x))
        for s in range(0, len(x), args.batch_size):
            idx = order[s : s + args.batch_size]
            xb = torch.from_numpy(x[idx]).float().div_(255)
            opt.zero_grad(set_to_none=True)
            loss_fn(net(xb), torch.from_numpy(y[idx])).backward()
            opt.step()
        print(f"epoch {epoch}/{args.epochs}: {time.perf_counter() - start:.1f} s", flush=True)
    correct = 0
    with torch.inference_mode():
        for s in range(0, len(xt), 256):
            xb = torch.from_numpy(xt[s : s + 256]).float().div_(255)
            correct += int((net(xb).argmax(1).numpy() == yt[s : s + 256]).sum())
    print(f"test accuracy {correct / len(xt):.2%} after {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
