"""The ``fastcnn`` command: train, evaluate, bench, info.

Nothing but ``os`` and ``sys`` (loaded with Python itself) is imported at the top: argparse,
NumPy, Numba and the rest load inside ``main``'s error handling, so a Ctrl-C or a failure at any
point after Python's own start ends in one ``fastcnn:`` line (``FASTCNN_DEBUG=1`` shows the
traceback as well).
"""

from __future__ import annotations

import os
import sys

from . import __version__

# What the parser offers (kept here so that building it imports nothing heavy); a test checks
# that these agree with the modules that define them.
BACKENDS = ("naive", "numpy", "numba")
DATASETS = ("mnist-sample", "mnist", "fashion-mnist")
MODELS = ("simple", "complex")
DEBUG_VAR = "FASTCNN_DEBUG"


def _checked(convert, ok, requirement, expected="a whole number"):
    """An argparse type: ``convert`` the text, then insist on ``ok`` (argparse names the flag)."""
    def parse(text):
        import argparse

        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return parse


_positive_int = _checked(int, lambda v: v >= 1, ">= 1")
_seed = _checked(int, lambda v: v >= 0, ">= 0")
_positive_float = _checked(float, lambda v: abs(v) != float("inf") and v > 0,
                           "a positive finite number", "a number")
_fraction = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)", "a number")


def _add_compute_args(p):
    p.add_argument("--backend", choices=BACKENDS,
                   help="kernel backend (default: $FASTCNN_BACKEND or numba)")
    p.add_argument("--threads", type=_positive_int,
                   help="threads for the kernels (Numba and BLAS; default: all cores)")


def _apply_compute_args(args):
    from . import backend, threads

    if args.backend:
        backend.set_backend(args.backend)
    if args.threads:
        threads.set_num_threads(args.threads)
    if backend.get_backend() == "naive":
        print("warning: the naive backend is the readable reference in plain Python loops, "
              "about a thousand times slower than numpy/numba: keep runs small (--limit 200); "
              "train tests on the first 200 test images unless --test-limit says otherwise",
              file=sys.stderr, flush=True)


def _add_data_args(p):
    p.add_argument("--dataset", default="mnist-sample", choices=DATASETS,
                   help="dataset (default: %(default)s, shipped with fastcnn, no network needed)")
    p.add_argument("--data-dir", help="folder holding <dataset>/ (default: $FASTCNN_DATA or "
                                      "~/.cache/fastcnn)")
    _add_compute_args(p)
    p.add_argument("--batch-size", type=_positive_int, default=None)


def _parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="fastcnn", description="Train and evaluate small CNNs on interchangeable kernel "
                                    "backends.")
    parser.add_argument("--version", action="version", version=f"fastcnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model and report its test accuracy")
    train.add_argument("--model", default="simple", choices=MODELS)
    _add_data_args(train)
    train.set_defaults(batch_size=10)
    train.add_argument("--epochs", type=_positive_int, default=5)
    train.add_argument("--lr", type=_positive_float, default=0.05, help="SGD learning rate")
    train.add_argument("--seed", type=_seed, default=0, help="seed for weights and shuffling")
    train.add_argument("--limit", type=_positive_int, help="train on the first N training images")
    train.add_argument("--test-limit", type=_positive_int,
                       help="test on the first N test images (default: all; 200 on naive)")
    train.add_argument("--val-fraction", type=_fraction, default=0.1,
                       help="fraction of the training images held out for validation "
                            "(default: %(default)s)")
    train.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    train.add_argument("--save", metavar="PATH", help="write the trained model (.npz) here")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="evaluate a saved model on a test set")
    evaluate.add_argument("path", help="model file written by 'fastcnn train --save'")
    _add_data_args(evaluate)
    evaluate.set_defaults(func=cmd_evaluate, batch_size=64)

    bench = sub.add_parser(
        "bench", help="training and inference speed of each backend (and PyTorch, if installed)",
        description="Train each backend (and PyTorch CPU, when installed) on the same model, "
                    "batch, threads and data, interleaved in one run; report images/s, epoch "
                    "time, peak memory, Numba's compile time and the ratios against PyTorch.")
    bench.add_argument("--model", nargs="+", default=["simple"], choices=MODELS)
    bench.add_argument("--batch-size", nargs="+", type=_positive_int, default=[10])
    bench.add_argument("--backend", nargs="+", default=["numpy", "numba"],
                       choices=BACKENDS,
                       help="backends to measure (default: numpy numba; naive is opt-in: it "
                            "runs one batch, which takes minutes on the complex model)")
    bench.add_argument("--threads", type=_positive_int,
                       help="threads for every engine, PyTorch included (default: all cores)")
    bench.add_argument("--rounds", type=_positive_int, default=3)
    bench.add_argument("--seconds", type=_positive_float, default=2.0,
                       help="about how long each engine trains (and infers) per round")
    bench.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    bench.add_argument("--no-compile-time", action="store_true",
                       help="skip timing Numba's cold and cached start (two extra processes)")
    bench.add_argument("--json", metavar="PATH", help="write the results as JSON")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    bench.set_defaults(func=cmd_bench)

    info = sub.add_parser("info", help="version, backends, threads, CPU")
    info.add_argument("--threads", type=_positive_int, help="show the effect of --threads N")
    info.set_defaults(func=cmd_info)
    return parser


def _split(x, y, limit, val_fraction):
    if limit is not None:
        x, y = x[:limit], y[:limit]
    n_val = int(round(len(x) * val_fraction))
    if n_val == 0:
        return (x, y), None
    return (x[:-n_val], y[:-n_val]), (x[-n_val:], y[-n_val:])


def cmd_train(args):
    import time

    from . import backend, datasets, models, serialize

    if args.save:  # now, not after the training
        serialize.check_destination(args.save)
    _apply_compute_args(args)
    (x, y), (x_test, y_test) = datasets.load(args.dataset, args.data_dir, raw=True)
    (x_train, y_train), val = _split(x, y, args.limit, args.val_fraction)
    if len(x_train) == 0:
        raise ValueError(f"no training images left: --limit {args.limit} with --val-fraction "
                         f"{args.val_fraction} holds them all out")
    test_limit = args.test_limit or (200 if backend.get_backend() == "naive" else None)
    x_test, y_test = x_test[:test_limit], y_test[:test_limit]
    net = models.build(args.model, dtype=args.dtype, seed=args.seed)
    held_out = f", {len(val[0])} validation" if val else ""
    print(f"fastcnn {__version__} | backend {backend.get_backend()} | model {args.model} "
          f"({net.num_params():,} parameters, {args.dtype}) | {args.dataset}: "
          f"{len(x_train)} training{held_out}, {len(x_test)} test images", flush=True)
    start = time.perf_counter()
    net.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            validation_data=val, seed=args.seed, verbose=True)
    trained = time.perf_counter() - start
    result = net.evaluate(x_test, y_test)
    if args.save:
        net.save(args.save)
        print(f"saved the model to {args.save}")
    print(f"test accuracy {result['accuracy']:.2%} (loss {result['loss']:.4f}, "
          f"{len(x_test)} images) after {trained:.1f} s of training")
    return 0


def cmd_evaluate(args):
    from . import backend, datasets
    from .network import ConvNet

    _apply_compute_args(args)
    net = ConvNet.load(args.path)
    _, (x_test, y_test) = datasets.load(args.dataset, args.data_dir, raw=True)
    result = net.evaluate(x_test, y_test, batch_size=args.batch_size)
    print(f"{args.path} on {args.dataset} test ({len(x_test)} images, backend "
          f"{backend.get_backend()}): accuracy {result['accuracy']:.2%}, "
          f"loss {result['loss']:.4f}")
    return 0


def cmd_bench(args):
    import json
    import time

    from . import atomic, benchmark, threads

    if args.threads and args.threads > threads.max_threads():
        raise ValueError(f"--threads must be at most {threads.max_threads()}")
    for path in (args.json, args.plot):  # before the benchmark, not after it
        if path:
            atomic.check_destination(path, "results")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--plot needs matplotlib: pip install 'fastcnn[plot]' (or leave "
                              "out --plot)") from None
    progress = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    results = benchmark.run(args.model, args.batch_size, args.backend, args.threads,
                            args.rounds, args.seconds, use_torch=not args.no_torch,
                            compile_time=not args.no_compile_time, progress=progress)
    machine = f"{_cpu_model()}, {os.cpu_count()} logical cores"
    print(f"fastcnn {__version__} bench on {machine}")
    for result in results:
        print()
        print(benchmark.format_table(result))
    if args.json:
        meta = {"fastcnn": __version__, "cpu": machine, "argv": sys.argv[1:],
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(args.json, "w") as f:
            json.dump(benchmark.to_json(results, meta), f, indent=2)
        print(f"\nwrote {args.json}")
    if args.plot:
        benchmark.plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _cpu_model():
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cmd_info(args):
    import platform

    import numba
    import numpy as np

    from . import backend, threads

    if args.threads:
        threads.set_num_threads(args.threads)
    blas = threads.blas_num_threads()
    rows = [
        ("fastcnn", __version__),
        ("python", platform.python_version()),
        ("numpy", f"{np.__version__}, BLAS threads: {'unknown' if blas is None else blas}"),
        ("numba", f"{numba.__version__}, {threads.get_num_threads()} threads "
                  f"(max {threads.max_threads()}), threading layer "
                  f"{threads.threading_layer()}"),
        ("backends", ", ".join(backend.available_backends())),
        ("active backend", backend.get_backend()),
        ("CPU", f"{_cpu_model()} ({os.cpu_count()} logical cores)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


# Failures whose message is meant for the user as it is; anything else is a bug or a resource
# problem, reported with its type (and the traceback with FASTCNN_DEBUG=1).
_EXPECTED = (ValueError, TypeError, OSError, FloatingPointError, ImportError)


def main(argv=None):
    debug = os.environ.get(DEBUG_VAR, "") not in ("", "0")
    try:
        args = _parser().parse_args(argv)
        from . import memory

        memory.retain_freed_memory()
        return args.func(args)
    except KeyboardInterrupt:
        print("fastcnn: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends in one line, as promised
        if debug:
            import traceback

            traceback.print_exc()
        text = str(e) if isinstance(e, _EXPECTED) and str(e) else f"{type(e).__name__}: {e}"
        hint = "" if debug or isinstance(e, _EXPECTED) else f" (set {DEBUG_VAR}=1 for details)"
        print(f"fastcnn: error: {text}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
