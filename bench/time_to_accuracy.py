"""Time to accuracy: a recipe on the full Fashion-MNIST, fastcnn against PyTorch.

    python bench/time_to_accuracy.py                       # modern recipe, 5 epochs, 2 threads
    python bench/time_to_accuracy.py --epochs 3 --json docs/time_to_accuracy.json
    python bench/time_to_accuracy.py --recipe resnet       # the ResNet's, its 15 epochs

Both engines train the same architecture (the recipe's model and its PyTorch twin) from the same
initial weights, on the same batches in the same order (one seeded permutation per epoch), with
the same optimizer (the recipe's: AdamW, or SGD with momentum), learning-rate schedule (linear
warm-up, then a cosine decay per batch), batch size, epochs and thread count; where the recipe
normalises and augments, both get the same per-channel statistics (from the training images) and
the same moved and mirrored images (fastcnn's Augment, drawn per batch from one seed, made by
the same NumPy code for both). Each runs in a process of its own
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

TARGETS = {"modern": (0.91, 0.92, 0.925), "resnet": (0.92, 0.93, 0.935, 0.94)}


def recipe_objects(engine, net_or_params, batches, epochs, recipe="modern"):
    """(optimizer, factor(t)) of the recipe for one engine."""
    from fastcnn import models, optim

    r = models.RECIPES[recipe]
    total = batches * epochs
    warmup = int(round(r["warmup_fraction"] * total))
    schedule = optim.Cosine(total - warmup, per="batch")
    if warmup:
        schedule = optim.WarmupThen(warmup, schedule)
    sgd = r["optimizer"] == "sgd"
    if engine == "fastcnn":
        if sgd:
            return optim.SGD(r["lr"], momentum=r["momentum"],
                             weight_decay=r["weight_decay"]), schedule
        return optim.AdamW(r["lr"], weight_decay=r["weight_decay"]), schedule
    import torch

    if sgd:
        return torch.optim.SGD(net_or_params, lr=r["lr"], momentum=r["momentum"],
                               weight_decay=r["weight_decay"]), schedule
    return torch.optim.AdamW(net_or_params, lr=r["lr"], weight_decay=r["weight_decay"]), schedule


def worker(engine, epochs, threads, seed, recipe="modern", dataset="fashion-mnist", limit=None):
    from fastcnn import datasets, memory, models
    from fastcnn.augment import Augment
    from fastcnn.bench_worker import copy_weights, torch_model

    r = models.RECIPES[recipe]
    (x, y), (xt, yt) = datasets.load(dataset, raw=True)
    x, y, xt, yt = x[:limit], y[:limit], xt[:limit], yt[:limit]
    batch = r["batch_size"]
    batches = -(-len(x) // batch)
    augment = Augment.parse(r.get("augment"))
    augment_key = int(np.random.SeedSequence(seed).generate_state(1)[0])
    net = models.build(r["model"], seed=seed)
    if r.get("normalize"):
        net.set_normalization(x=x)  # the same statistics for both engines
    buf = np.empty((batch, 1, 28, 28), np.float32)
    if engine == "fastcnn":
        import fastcnn

        memory.retain_freed_memory()
        fastcnn.set_num_threads(threads)
        opt, schedule = recipe_objects(engine, None, batches, epochs, recipe)
        normalization = net.normalization
        net.train_step(net.prepare_batch(x, np.arange(batch), buf), y[:batch], fastcnn.SGD(1e-12))
        net = models.build(r["model"], seed=seed)  # compiled now; start again from the seed's
        net.normalization = normalization
    else:
        import torch

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        tnet = torch_model(r["model"])
        copy_weights(net, tnet)
        opt, schedule = recipe_objects(engine, tnet.parameters(), batches, epochs, recipe)
        loss_fn = torch.nn.CrossEntropyLoss()
        xtf = torch.from_numpy(net.prepare_batch(xt, np.arange(len(xt))))
        yy = torch.from_numpy(y)
    rng = np.random.default_rng(seed)
    step = 0
    epoch = 0
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        order = rng.permutation(len(x))
        start = time.perf_counter()
        if engine == "fastcnn":
            net.train()
        else:
            tnet.train()
        for b, s in enumerate(range(0, len(x), batch)):
            idx = order[s : s + batch]
            # the same images for both: fastcnn's preparation (scale, normalise) and moves
            xb = net.prepare_batch(x, idx, buf)
            if augment:
                xb = augment.apply(xb, np.random.default_rng([augment_key, epoch, b]))
            if engine == "fastcnn":
                opt.lr = opt.base_lr * schedule.factor(step)
                net.train_step(xb, y[idx], opt)
            else:
                for group in opt.param_groups:
                    group["lr"] = r["lr"] * schedule.factor(step)
                opt.zero_grad(set_to_none=True)
                loss_fn(tnet(torch.from_numpy(xb)), yy[idx]).backward()
                opt.step()
            step += 1
        seconds = time.perf_counter() - start
        epoch += 1
        if engine == "fastcnn":
            acc = net.evaluate(xt, yt, batch_size=256)["accuracy"]
        else:
            tnet.eval()
            with torch.inference_mode():
                pred = torch.cat([tnet(xtf[s : s + 256]).argmax(1) for s in range(0, len(xt), 256)])
            acc = float((pred.numpy() == yt).mean())
        print(json.dumps({"seconds": seconds, "accuracy": acc}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", choices=tuple(TARGETS), default="modern")
    p.add_argument("--epochs", type=int, help="default: the recipe's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dataset", default="fashion-mnist", help="a fastcnn.datasets name")
    p.add_argument("--limit", type=int, help="only the first N training and test images "
                   "(a quick check of the script, not a result)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", choices=("fastcnn", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.epochs is None:
        from fastcnn import models

        args.epochs = models.RECIPES[args.recipe]["epochs"]
    if args.worker:
        return worker(args.worker, args.epochs, args.threads, args.seed, args.recipe,
                      args.dataset, args.limit)
    from fastcnn import spawn

    engines = ("fastcnn", "torch")
    procs = {e: subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", e, "--epochs", str(args.epochs),
         "--threads", str(args.threads), "--seed", str(args.seed), "--recipe", args.recipe,
         "--dataset", args.dataset] + ([] if args.limit is None else ["--limit", str(args.limit)]),
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
    print(f"\ntraining seconds to reach each test accuracy ({args.recipe} recipe, {args.dataset}, "
          f"{args.threads} threads):")
    print(f"{'target':>8} {'fastcnn':>12} {'PyTorch':>12} {'ratio':>7}")
    table = []
    for target in TARGETS[args.recipe]:
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
