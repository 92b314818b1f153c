"""GFLOP/s of each convolution pass on the seed's layer shapes: fastcnn's backends against PyTorch.

    python bench/layers.py [--batch 10] [--rounds 3] [--engines numba numpy torch]

Every engine runs in a process of its own (no two thread runtimes share one), and the engines
take turns, round after round, so a shared machine's drift hits them alike. Prints the median
GFLOP/s per (layer, pass) and numba's ratio to PyTorch. The forward pass, the weight gradient and
the input gradient are timed separately; for PyTorch, the gradients are
torch.nn.grad.conv2d_weight / conv2d_input, which call the same kernels as autograd. "backward"
is both gradients as training computes them (counted as two passes of FLOPs): numba's
conv2d_backward with the layout of x its forward pass kept (dy laid out once for both), PyTorch's
aten.convolution_backward, the one call autograd makes.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

# name: (C, H, F), 3x3 kernels, padding 1, stride 1, float32
LAYERS = {
    "simple.conv1": (1, 28, 8),
    "complex.conv1": (1, 28, 32),
    "complex.conv2": (32, 28, 32),
    "complex.conv3": (32, 14, 64),
    "complex.conv4": (64, 14, 64),
}
PASSES = ("forward", "grad_weight", "grad_input", "backward")
FLOPS_PER_PASS = {"forward": 1, "grad_weight": 1, "grad_input": 1, "backward": 2}


def passes_for(engine, n, c, h, f):
    """{pass: zero-argument callable} for one layer shape."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, h)).astype(np.float32)
    w = rng.standard_normal((f, c, 3, 3)).astype(np.float32)
    b = np.zeros(f, np.float32)
    dy = rng.standard_normal((n, f, h, h)).astype(np.float32)
    if engine == "torch":
        import torch

        tx, tw, tb, tdy = (torch.from_numpy(a) for a in (x, w, b, dy))
        conv = torch.nn.functional.conv2d
        return {
            "forward": lambda: conv(tx, tw, tb, padding=1),
            "grad_weight": lambda: torch.nn.grad.conv2d_weight(tx, tw.shape, tdy, padding=1),
            "grad_input": lambda: torch.nn.grad.conv2d_input(tx.shape, tw, tdy, padding=1),
            "backward": lambda: torch.ops.aten.convolution_backward(
                tdy, tx, tw, [f], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True]),
        }
    from fastcnn import backend
    from fastcnn.kernels import _contract

    k = backend.load(engine)
    if _contract.has(k, "conv2d_saved_layout"):
        _, saved = k.conv2d_forward_saving(x, w, b, 1, 1)
        both = lambda: k.conv2d_backward(x, dy, w, 1, 1, True, saved)  # noqa: E731
    else:
        both = lambda: (k.conv2d_grad_weight(x, dy, 3, 1, 1),  # noqa: E731
                        k.conv2d_grad_input(dy, w, x.shape, 1, 1))
    return {
        "forward": lambda: k.conv2d_forward(x, w, b, 1, 1),
        "grad_weight": lambda: k.conv2d_grad_weight(x, dy, 3, 1, 1),
        "grad_input": lambda: k.conv2d_grad_input(dy, w, x.shape, 1, 1),
        "backward": both,
    }


def worker(engine, batch):
    """Serve 'run <layer> <pass> <seconds>' lines with the measured GFLOP/s."""
    if engine == "torch":
        import torch  # noqa: F401  (import before timing anything)
    fns = {name: passes_for(engine, batch, *shape) for name, shape in LAYERS.items()}
    for fn in (f for d in fns.values() for f in d.values()):
        fn()  # compile / warm up
    print("ready", flush=True)
    for line in sys.stdin:
        _, name, which, seconds = line.split()
        c, h, f = LAYERS[name]
        fn = fns[name][which]
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < float(seconds):
            fn()
            runs += 1
        elapsed = (time.perf_counter() - start) / runs
        flops = FLOPS_PER_PASS[which] * 2 * batch * f * c * 9 * h * h
        print(json.dumps(flops / elapsed / 1e9), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=0.3)
    p.add_argument("--engines", nargs="+", default=["numba", "numpy", "torch"])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.batch)
    procs = {}
    for e in args.engines:
        procs[e] = subprocess.Popen([sys.executable, __file__, "--worker", e, "--batch",
                                     str(args.batch)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        if procs[e].stdout.readline().strip() != "ready":
            sys.exit(f"the {e} worker failed to start")
    rates = {(n, w, e): [] for n in LAYERS for w in PASSES for e in args.engines}
    for r in range(args.rounds):
        for name in LAYERS:
            for which in PASSES:
                for e in args.engines[r % len(args.engines):] + args.engines[: r % len(
                        args.engines)]:
                    procs[e].stdin.write(f"run {name} {which} {args.seconds}\n")
                    procs[e].stdin.flush()
                    rates[name, which, e].append(float(procs[e].stdout.readline()))
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    head = ["layer", "pass", *[f"{e} GF/s" for e in args.engines]]
    if "torch" in args.engines and "numba" in args.engines:
        head.append("numba/torch")
    print(f"batch {args.batch}, float32, median of {args.rounds} interleaved rounds")
    print(" | ".join(head))
    for name in LAYERS:
        for which in PASSES:
            med = {e: statistics.median(rates[name, which, e]) for e in args.engines}
            row = [name, which, *[f"{med[e]:.1f}" for e in args.engines]]
            if len(head) > len(row):
                row.append(f"{med['numba'] / med['torch']:.2f}x")
            print(" | ".join(row))


if __name__ == "__main__":
    main()
