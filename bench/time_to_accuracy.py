"""Time to accuracy: the modern recipe on the full Fashion-MNIST, fastcnn against PyTorch.

    python bench/time_to_accuracy.py                       # 5 epochs, 2 threads each
    python bench/time_to_accuracy.py --epochs 3 --json docs/time_to_accuracy.json

Both engines train the same architecture (models.modern_cnn and its PyTorch twin) from the same
initial weights, on the same batches in the same order (one seeded permutation per epoch), with
the same optimizer (AdamW), learning-rate schedule (linear warm-up over 3% of the batches, then a
cosine decay per batch), batch size, epochs and thread count. Each runs in a process of its own
and they alternate epoch by epoch, so that a shared machine's drift hits both alike. After every
epoch each engine's model is evaluated on the 10,000 test images (not counted as training time).
The table gives the training seconds at the end of the first epoch whose test accuracy reaches
each target (accuracy is only measured at epoch ends), and the ratio fastcnn / PyTorch.
Needs `apt-get install dataset-fashion-mnist` (or the files in the cache) and torch==2.13.0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

TARGETS = (0.91, 0.92, 0.925)


def recipe_objects(engine, net_or_params, batches, epochs):
    """(optimizer, factor(t)) of the modern recipe for one engine."""
    from fastcnn import models, optim

    r = models.RECIPES["modern"]
    total = batches * epochs
    warmup = int(round(r["warmup_fraction"] * total))
    schedule = optim.WarmupThen(warmup, optim.Cosine(total - warmup, per="batch"))
    if engine == "fastcnn":
        return optim.AdamW(r["lr"], weight_decay=r["weight_decay"]), schedule
    import torch

    return torch.optim.AdamW(net_or_params, lr=r["lr"], weight_decay=r["weight_decay"]), schedule


def worker(engine, epochs, threads, seed):
    from fastcnn import datasets, memory, models
    from fastcnn.bench_worker import copy_weights, torch_model

    (x, y), (xt, yt) = datasets.load("fashion-mnist", raw=True)
    batch = models.RECIPES["modern"]["batch_size"]
    batches = -(-len(x) // batch)
    net = models.build("modern", seed=seed)
    if engine == "fastcnn":
        import fastcnn

        memory.retain_freed_memory()
        fastcnn.set_num_threads(threads)
        opt, schedule = recipe_objects(engine, None, batches, epochs)
        buf = np.empty((batch, 1, 28, 28), np.float32)
        net.train_step(net.prepare_batch(x, np.arange(batch), buf), y[:batch], fastcnn.SGD(1e-12))
        net = models.build("modern", seed=seed)  # compiled now; start again from seed's weights
    else:
        import torch

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        tnet = torch_model("modern")
        copy_weights(net, tnet)
        opt, schedule = recipe_objects(engine, tnet.parameters(), batches, epochs)
        loss_fn = torch.nn.CrossEntropyLoss()
        xf = torch.from_numpy(x.astype(np.float32) / np.float32(255))
        xtf = torch.from_numpy(xt.astype(np.float32) / np.float32(255))
        yy = torch.from_numpy(y)
    rng = np.random.default_rng(seed)
    step = 0
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        order = rng.permutation(len(x))
        start = time.perf_counter()
        if engine == "fastcnn":
            net.train()
            for s in range(0, len(x), batch):
                idx = order[s : s + batch]
                opt.lr = opt.base_lr * schedule.factor(step)
                net.train_step(net.prepare_batch(x, idx, buf), y[idx], opt)
                step += 1
            seconds = time.perf_counter() - start
            acc = net.evaluate(xt, yt, batch_size=256)["accuracy"]
        else:
            tnet.train()
            for s in range(0, len(x), batch):
                idx = torch.from_numpy(order[s : s + batch])
                for group in opt.param_groups:
                    group["lr"] = models.RECIPES["modern"]["lr"] * schedule.factor(step)
                opt.zero_grad(set_to_none=True)
                loss_fn(tnet(xf[idx]), yy[idx]).backward()
                opt.step()
                step += 1
            seconds = time.perf_counter() - start
            tnet.eval()
            with torch.inference_mode():
                pred = torch.cat([tnet(xtf[s : s + 256]).argmax(1) for s in range(0, len(xt), 256)])
            acc = float((pred.numpy() == yt).mean())
        print(json.dumps({"seconds": seconds, "accuracy": acc}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", choices=("fastcnn", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.epochs, args.threads, args.seed)
    from fastcnn import spawn

    engines = ("fastcnn", "torch")
    procs = {e: subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", e, "--epochs", str(args.epochs),
         "--threads", str(args.threads), "--seed", str(args.seed)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=spawn.environment())
        for e in engines}
    for e, proc in procs.items():
        if json.loads(proc.stdout.readline()).get("ready") is not True:
            raise RuntimeError(f"the {e} worker did not start")
    results = {e: [] for e in engines}
    for epoch in range(1, args.epochs + 1):
        for e in engines if epoch % 2 else engines[::-1]:
            procs[e].stdin.write("epoch\n")
            procs[e].stdin.flush()
            r = json.loads(procs[e].stdout.readline())
            done = sum(x["seconds"] for x in results[e]) + r["seconds"]
            results[e].append({**r, "cumulative_s": done})
            print(f"epoch {epoch}: {e:8s} test accuracy {r['accuracy']:.2%} after {done:.1f} s "
                  f"of training ({r['seconds']:.1f} s this epoch)", flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    print(f"\ntraining seconds to reach each test accuracy (modern recipe, Fashion-MNIST, "
          f"{args.threads} threads):")
    print(f"{'target':>8} {'fastcnn':>12} {'PyTorch':>12} {'ratio':>7}")
    table = []
    for target in TARGETS:
        row = {"target": target}
        for e in engines:
            hit = next((r for r in results[e] if r["accuracy"] >= target), None)
            row[e] = None if hit is None else hit["cumulative_s"]
        ratio = row["fastcnn"] / row["torch"] if row["fastcnn"] and row["torch"] else None
        row["ratio"] = ratio
        table.append(row)

        def cell(v):
            return "not reached" if v is None else f"{v:.1f} s"
        print(f"{target:>8.1%} {cell(row['fastcnn']):>12} {cell(row['torch']):>12} "
              f"{'-' if ratio is None else f'{ratio:.2f}x':>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"epochs": results, "table": table, "argv": sys.argv[1:]}, f, indent=2)


if __name__ == "__main__":
    main()
