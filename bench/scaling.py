"""Scaling with the cores: training speed at 1, 2, 4, ... threads, and what limits it.

    python bench/scaling.py                                  # complex and modern, batch 10 and 64
    python bench/scaling.py --threads 1 2 4 8 16 --models complex --batches 64 --no-torch

For each model and batch: fastcnn's (numba) training images/s at each thread count and its
parallel efficiency, speed / (min(threads, cores) x speed on 1 thread); PyTorch's beside it
where installed. Counts past the cores this process may use are oversubscribed: they cannot be
faster, and how much slower they are is what each extra thread costs (fork/join, partial sums,
a thread waiting for a core). At 1 thread: the share of a step spent outside numba's parallel
kernels (Python, dispatch, small serial operations), and in laying out planes. For each
convolution pass of the complex model (bench/layers.py's shapes): GFLOP/s at each thread count
within the cores, as a share of the FMA peak, measured here by a probe of independent float32
FMA chains (one core's probe x threads).

Each engine runs in a process of its own (NUMBA_NUM_THREADS = the largest count asked for), and
the engines take turns, round after round; medians are printed. Say which CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layers  # noqa: E402  (bench/layers.py: the convolution passes and their FLOPs)

PASSES = ("forward", "grad_weight", "grad_input")
CONV_LAYERS = ("complex.conv2", "complex.conv3", "complex.conv4")


# -- the worker: one engine, in a process of its own --------------------------------------------


def _fma_chains():
    from numba import njit, prange

    @njit(fastmath=True, parallel=True, cache=False)
    def chains(n, out, x, y):
        for t in prange(out.shape[0]):
            a = np.ones(256, np.float32)  # 256 independent chains: the FMA units never wait
            for _ in range(n):
                for k in range(256):
                    a[k] = a[k] * x + y
            out[t] = a.sum()

    return chains


def fma_peak(threads):
    """GFLOP/s of float32 FMAs on ``threads`` threads, each its own chains (the best of 5)."""
    import numba

    numba.set_num_threads(threads)
    chains, out = _fma_chains(), np.zeros(threads, np.float32)
    chains(2, out, np.float32(0.999), np.float32(0.001))
    n, best = 50_000, float("inf")
    for _ in range(5):
        start = time.perf_counter()
        chains(n, out, np.float32(0.999), np.float32(0.001))
        best = min(best, time.perf_counter() - start)
    return 2 * 256 * n * threads / best / 1e9


class Worker:
    def __init__(self, engine):
        self.engine = engine
        self.steps, self.passes = {}, {}
        if engine == "torch":
            import torch

            self.torch = torch
            torch.set_num_interop_threads(1)
        else:
            from fastcnn import memory

            memory.retain_freed_memory()

    def set_threads(self, n):
        if self.engine == "torch":
            self.torch.set_num_threads(n)
        else:
            from fastcnn import threads

            threads.set_num_threads(n)

    def step_fn(self, model, batch):
        key = (model, batch)
        if key not in self.steps:
            from fastcnn.bench_worker import make_engine

            rng = np.random.default_rng(0)
            x = rng.integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)
            y = rng.integers(0, 10, batch)
            eng = make_engine("numba" if self.engine == "fastcnn" else "torch", model, batch,
                              None)
            self.steps[key] = lambda: eng.train(x, y)
            self.steps[key]()
        return self.steps[key]

    def timed(self, fn, seconds):
        fn()
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or runs < 3:
            fn()
            runs += 1
        return (time.perf_counter() - start) / runs

    def step(self, model, batch, threads, seconds):
        self.set_threads(threads)
        return batch / self.timed(self.step_fn(model, int(batch)), seconds)

    def conv_pass(self, name, which, batch, threads, seconds):
        self.set_threads(threads)
        key = (name, batch)
        if key not in self.passes:
            c, h, f = layers.LAYERS[name]
            engine = "numba" if self.engine == "fastcnn" else "torch"
            self.passes[key] = layers.passes_for(engine, batch, c, h, f)
        c, h, f = layers.LAYERS[name]
        flops = 2 * batch * f * c * 9 * h * h
        return flops / self.timed(self.passes[key][which], seconds) / 1e9

    def split(self, model, batch):
        """At 1 thread: (share of a step outside numba's parallel kernels, share laying out)."""
        from numba.core.registry import CPUDispatcher

        from fastcnn.kernels import numba_jit

        self.set_threads(1)
        fn = self.step_fn(model, batch)
        fn()  # everything compiled: the wrappers below are never compiled into other kernels
        spent = {"layout": 0.0, "kernel": 0.0}

        def timed(kind, kernel):
            def call(*args):
                start = time.perf_counter()
                try:
                    return kernel(*args)
                finally:
                    spent[kind] += time.perf_counter() - start
            call.__wrapped__ = kernel
            return call

        def kind(kernel):
            return "layout" if "lay_out" in kernel.__name__ else "kernel"

        saved = {}
        for name, obj in vars(numba_jit).items():
            if isinstance(obj, CPUDispatcher) and obj.targetoptions.get("parallel"):
                saved[name] = obj
                setattr(numba_jit, name, timed(kind(obj), obj))
        run = saved["_run"] = numba_jit._run  # a kernel or its serial twin: timed as one

        def run_timed(kernel, serial, *args):
            kernel = getattr(kernel, "__wrapped__", kernel)
            return timed(kind(kernel), run)(kernel, serial, *args)
        numba_jit._run = run_timed
        for name in ("_tiled_forward", "_chunked_grad_weight"):  # compiled wrappers of kernels
            make = saved[name] = getattr(numba_jit, name)
            setattr(numba_jit, name, lambda *a, _make=make: timed("kernel", _make(*a)))
        try:
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < 1.0 or runs < 3:
                fn()
                runs += 1
            total = (time.perf_counter() - start) / runs
        finally:
            for name, obj in saved.items():
                setattr(numba_jit, name, obj)
        inside = (spent["layout"] + spent["kernel"]) / runs
        return {"outside": 1 - inside / total, "layouts": spent["layout"] / runs / total,
                "step_ms": total * 1e3}


def serve(engine):
    worker = Worker(engine)
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        what, *args = line.split()
        if what == "step":
            model, batch, threads, seconds = args
            out = worker.step(model, int(batch), int(threads), float(seconds))
        elif what == "pass":
            name, which, batch, threads, seconds = args
            out = worker.conv_pass(name, which, int(batch), int(threads), float(seconds))
        elif what == "split":
            out = worker.split(args[0], int(args[1]))
        elif what == "fma":
            out = fma_peak(int(args[0]))
        else:
            raise SystemExit(f"unknown request {what!r}")
        print(json.dumps(out), flush=True)


# -- the parent: engines in turn, tables ---------------------------------------------------------


def start(engine, max_threads):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(max_threads))
    proc = subprocess.Popen([sys.executable, __file__, "--worker", engine], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    if json.loads(proc.stdout.readline() or "null") != "ready":
        sys.exit(f"the {engine} worker failed to start")
    return proc


def ask(proc, *words):
    proc.stdin.write(" ".join(map(str, words)) + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def in_turns(procs, rounds, request):
    """{engine: [answers]}: ``request(proc)`` asked of every engine, in a rotating order."""
    answers = {e: [] for e in procs}
    names = list(procs)
    for r in range(rounds):
        for e in names[r % len(names):] + names[: r % len(names)]:
            answers[e].append(request(procs[e]))
    return answers


def default_counts(cores):
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    counts.append(cores)
    n = cores * 2
    while n <= 16 and cores < 8:  # few cores: the oversubscribed counts show per-thread costs
        counts.append(n)
        n *= 2
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["complex", "modern"])
    p.add_argument("--batches", nargs="+", type=int, default=[10, 64])
    p.add_argument("--threads", nargs="+", type=int, help="thread counts (default: 1, 2, 4, "
                   "... up to the cores, then twice and more on a machine of few cores)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.0, help="timing per measurement")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-passes", action="store_true", help="skip the per-pass table")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return serve(args.worker)
    from fastcnn import threads

    cores = threads.available_cores()
    counts = sorted(set(args.threads or default_counts(cores)))
    engines = ["fastcnn"]
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            engines.append("torch")
        except ImportError:
            print("PyTorch is not installed: fastcnn alone", file=sys.stderr)
    procs = {e: start(e, max(counts)) for e in engines}
    peak1 = ask(procs["fastcnn"], "fma", 1)
    print(f"{cores} cores this process may use; FMA probe: {peak1:.1f} GFLOP/s on one core "
          f"(float32); thread counts {counts}; medians of {args.rounds} interleaved rounds")
    for model in args.models:
        for batch in args.batches:
            report_steps(procs, model, batch, counts, cores, args)
    if not args.no_passes:
        report_passes(procs, [n for n in counts if n <= cores], peak1, args)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()


def report_steps(procs, model, batch, counts, cores, args):
    speed = {}
    for n in counts:
        got = in_turns(procs, args.rounds,
                       lambda proc, n=n: ask(proc, "step", model, batch, n, args.seconds))
        speed.update({(e, n): statistics.median(v) for e, v in got.items()})
    split = ask(procs["fastcnn"], "split", model, batch)
    print(f"\n{model}, batch {batch}: training img/s (efficiency against 1 thread)")
    head = ["threads", *(f"{e}" for e in procs)]
    if "torch" in procs:
        head.append("fastcnn/torch")
    print(" | ".join(head))
    for n in counts:
        row = [f"{n}{' (over)' if n > cores else ''}"]
        for e in procs:
            eff = speed[e, n] / (min(n, cores) * speed[e, counts[0]] / counts[0])
            row.append(f"{speed[e, n]:,.0f} ({eff:.0%})")
        if "torch" in procs:
            row.append(f"{speed['fastcnn', n] / speed['torch', n]:.2f}x")
        print(" | ".join(row))
    print(f"at 1 thread a step took {split['step_ms']:.2f} ms: {split['outside']:.1%} outside "
          f"numba's parallel kernels, {split['layouts']:.1%} laying out planes")


def report_passes(procs, counts, peak1, args):
    print("\ncomplex model's convolution passes, batch 64: GFLOP/s (share of the FMA peak)")
    head = ["layer", "pass", *(f"{e} {n}t" for n in counts for e in procs)]
    print(" | ".join(head))
    for name in CONV_LAYERS:
        for which in PASSES:
            row = [name, which]
            for n in counts:
                got = in_turns(procs, args.rounds, lambda proc, n=n, name=name, which=which:
                               ask(proc, "pass", name, which, 64, n, min(args.seconds, 0.3)))
                for e in procs:
                    g = statistics.median(got[e])
                    row.append(f"{g:.0f} ({g / (peak1 * n):.0%})")
            print(" | ".join(row))


if __name__ == "__main__":
    main()
