"""Where a training step of a model goes: every layer's forward and backward pass and the
optimizer's update, timed one by one in this process (numba backend by default), beside the
whole step; for BatchNorm, also PyTorch's BatchNorm2d on the same tensors, with GB/s.

    python bench/step_breakdown.py                         # modern model, batch 64, AdamW
    python bench/step_breakdown.py --model complex --optimizer sgd

Every time is the fastest of --repeat runs of --number calls (a shared machine adds noise, not
speed). GB/s counts each pass's compulsory traffic: forward reads x and writes y; backward reads
dy and x and writes dx (the per-channel vectors are negligible).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def fastest(fn, number, repeat):
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="modern", choices=("simple", "complex", "modern"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--backend", default="numba")
    p.add_argument("--optimizer", default="adamw", choices=("sgd", "adam", "adamw"))
    p.add_argument("--threads", type=int)
    p.add_argument("--number", type=int, default=5)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args()

    import fastcnn
    from fastcnn import memory, models, optim
    from fastcnn.layers import _BatchNorm

    memory.retain_freed_memory()
    fastcnn.set_backend(args.backend)
    if args.threads:
        fastcnn.set_num_threads(args.threads)
    net = models.build(args.model, seed=0)
    opt = optim.OPTIMIZERS[args.optimizer](1e-3)
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, args.batch)
    net.train()
    step = fastest(lambda: net.train_step(x, y, opt), args.number, args.repeat)

    # each layer on its own, on the activations of a real forward pass
    inputs, a = [], x
    for layer in net.layers:
        inputs.append(a)
        a = layer.forward(a)
    rows = []
    for i, (layer, a) in enumerate(zip(net.layers, inputs, strict=True)):
        out = layer.forward(a)
        dy = rng.standard_normal(out.shape).astype(np.float32)
        fwd = fastest(lambda layer=layer, a=a: layer.forward(a), args.number, args.repeat)
        layer.forward(a)
        bwd = fastest(lambda layer=layer, dy=dy, i=i: layer.backward(dy, need_dx=i > 0),
                      args.number, args.repeat)
        rows.append((i, layer, a, fwd, bwd))
    update = fastest(lambda: opt.step(net), args.number, args.repeat)

    print(f"{args.model} model, batch {args.batch}, backend {args.backend}, "
          f"{fastcnn.get_num_threads()} threads, optimizer {type(opt).__name__}")
    print(f"whole training step: {step * 1e3:.2f} ms")
    print(f"{'layer':44s} {'forward':>9s} {'backward':>9s} {'share':>6s}")
    groups = {}
    for i, layer, _, fwd, bwd in rows:
        name = f"{i:2d} {layer!r}"[:44]
        print(f"{name:44s} {fwd * 1e3:7.2f}ms {bwd * 1e3:7.2f}ms {(fwd + bwd) / step:6.1%}")
        groups[type(layer).__name__] = groups.get(type(layer).__name__, 0) + fwd + bwd
    print(f"{'optimizer update (' + type(opt).__name__ + ')':44s} {update * 1e3:7.2f}ms "
          f"{'':9s} {update / step:6.1%}")
    print("by layer type: " + ", ".join(f"{k} {v / step:.1%}" for k, v in groups.items()))

    bns = [(layer, a, fwd, bwd) for _, layer, a, fwd, bwd in rows if isinstance(layer, _BatchNorm)]
    if bns and not args.no_torch:
        try:
            import torch
        except ImportError:
            return
        if args.threads:
            torch.set_num_threads(args.threads)
        print("\nBatchNorm against PyTorch (forward / backward, GB/s of compulsory traffic):")
        for layer, a, fwd, bwd in bns:
            tbn = (torch.nn.BatchNorm2d if a.ndim == 4 else torch.nn.BatchNorm1d)(layer.channels)
            tx = torch.from_numpy(a).requires_grad_(True)
            tdy = torch.from_numpy(rng.standard_normal(a.shape).astype(np.float32))

            def t_fwd(tbn=tbn, tx=tx):
                with torch.no_grad():
                    tbn(tx)

            def t_bwd(tbn=tbn, tx=tx, tdy=tdy):
                ty = tbn(tx)
                ty.backward(tdy)

            tf = fastest(t_fwd, args.number, args.repeat)
            tfb = fastest(t_bwd, args.number, args.repeat)
            tb = max(tfb - tf, 1e-9)
            nbytes = a.nbytes
            print(f"  {tuple(a.shape)}: fastcnn {fwd * 1e3:.2f} / {bwd * 1e3:.2f} ms "
                  f"({2 * nbytes / fwd / 1e9:.1f} / {3 * nbytes / bwd / 1e9:.1f} GB/s), "
                  f"PyTorch {tf * 1e3:.2f} / {tb * 1e3:.2f} ms "
                  f"({2 * nbytes / tf / 1e9:.1f} / {3 * nbytes / tb / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
