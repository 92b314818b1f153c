"""Inference speed: fastcnn against onnxruntime on the same model, in one process.

    python bench/onnx_speed.py                           # complex and resnet, batch 1 and 64
    python bench/onnx_speed.py --models complex --batch 64 --rounds 5 --seconds 2

Each model is built by ``fastcnn.models`` for 1x28x28 digits, exported with ``net.to_onnx``
and loaded in an onnxruntime session (CPU provider, ``--threads`` intra-op threads, one
inter-op thread); fastcnn runs with ``--threads`` threads on the numba backend. Both get the
same prepared float32 batch of real digits (mnist-sample): fastcnn ``net.forward`` in inference
mode, onnxruntime ``session.run`` of the ``scores`` output; the two are checked to agree before
anything is timed, and each runs once untimed (Numba compiles there). Then, round after round,
each engine runs for ``--seconds``, taking turns; speeds are img/s medians over rounds, the
ratio fastcnn / onnxruntime the median of the per-round ratios. Needs
``pip install -e '.[onnx]'``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import fastcnn
from fastcnn import datasets, models


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def engines(name, threads, folder):
    """{engine: run(x) -> scores} for model ``name``: fastcnn's forward and onnxruntime's."""
    net = models.build(name).eval()
    path = Path(folder) / f"{name}.onnx"
    net.to_onnx(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return net, {"fastcnn": net.forward,
                 "onnxruntime": lambda x: session.run(["scores"], {"images": x})[0]}


def rate(run, x, seconds):
    """Images per second of ``run(x)`` called for at least ``seconds`` (and at least twice)."""
    calls, start = 0, time.perf_counter()
    while True:
        run(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 2:
            return calls * len(x) / elapsed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["complex", "resnet"], choices=models.MODELS)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    fastcnn.set_backend("numba")
    fastcnn.set_num_threads(args.threads)
    (x_all, _), _ = datasets.load("mnist-sample", raw=True)
    print(f"fastcnn {fastcnn.__version__} (numba) against onnxruntime {ort.__version__} (CPU), "
          f"{args.threads} threads each; {cpu_model()}, {os.cpu_count()} logical cores; "
          f"{args.rounds} rounds of {args.seconds:g} s per engine, taking turns")
    print("model | batch | fastcnn img/s | onnxruntime img/s | fastcnn / onnxruntime")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            net, runs = engines(name, args.threads, folder)
            for batch in args.batch:
                x = net.prepare_batch(x_all, np.arange(batch))
                ours, theirs = (run(x) for run in runs.values())  # untimed: compiles
                np.testing.assert_allclose(ours, theirs, rtol=1e-4,
                                           atol=1e-4 * np.abs(theirs).max())
                speeds = {engine: [] for engine in runs}
                for _ in range(args.rounds):
                    for engine, run in runs.items():
                        speeds[engine].append(rate(run, x, args.seconds))
                ratio = statistics.median(a / b for a, b in zip(*speeds.values(), strict=True))
                a, b = (statistics.median(v) for v in speeds.values())
                print(f"{name} | {batch} | {a:,.0f} | {b:,.0f} | {ratio:.2f}x")


if __name__ == "__main__":
    main()
