"""The ``fastcnn`` command: train, evaluate, summary, export, import, plot, predict, bench, info.

Each command is a ``cmd_<command>(args)`` with its ``_add_<command>_parser`` right above it.

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
DATASETS = ("mnist-sample", "mnist", "fashion-mnist", "cifar-10", "folder")
PICTURE_STYLES = ("digit", "fashion", "none", "photo")
MODELS = ("simple", "complex", "modern", "resnet")
RECIPE_NAMES = ("seed", "modern", "resnet")
OPTIMIZER_NAMES = ("sgd", "adam", "adamw")
SCHEDULE_NAMES = ("constant", "step", "cosine")  # warm-up is a flag of its own: --warmup
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
                   help="threads for the kernels (Numba and BLAS; default: all the cores this "
                        "process may use, a container's CPU quota included, and on numba "
                        "training uses fewer while that is faster, e.g. on a shared machine)")


def _apply_compute_args(args):
    from . import backend, threads

    if args.backend:
        backend.set_backend(args.backend)
    if args.threads:
        threads.set_num_threads(args.threads)
    if backend.get_backend() == "naive":
        print("warning: the naive backend is the readable reference in plain Python loops, "
              "600x slower than numpy and 1,500x slower than numba on the simple model (README, "
              "Results): keep runs small (--limit 200); "
              "train tests on the first 200 test images unless --test-limit says otherwise",
              file=sys.stderr, flush=True)


def _add_data_args(p, batch_help):
    p.add_argument("--dataset", choices=DATASETS,
                   help="dataset (default: mnist-sample, shipped with fastcnn, no network needed)")
    p.add_argument("--data-dir", help="folder holding <dataset>/ (default: $FASTCNN_DATA or "
                                      "~/.cache/fastcnn); for --dataset folder, your picture "
                                      "tree: train/<class>/*.png, test/<class>/*.png")
    _add_compute_args(p)
    if batch_help:
        p.add_argument("--batch-size", type=_positive_int, default=None, help=batch_help)


def _parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="fastcnn", description="Train and evaluate small CNNs on interchangeable kernel "
                                    "backends.")
    parser.add_argument("--version", action="version", version=f"fastcnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train_parser, _add_evaluate_parser, _add_summary_parser, _add_export_parser,
                _add_import_parser, _add_bench_parser, _add_plot_parser, _add_predict_parser,
                _add_info_parser):
        add(sub)
    return parser


def _split(x, y, limit, val_fraction):
    if limit is not None:
        x, y = x[:limit], y[:limit]
    n_val = int(round(len(x) * val_fraction))
    if n_val == 0:
        return (x, y), None
    return (x[:-n_val], y[:-n_val]), (x[-n_val:], y[-n_val:])


# What `fastcnn train --resume` takes from the checkpoint's run record, not from its flags.
_RUN_KEYS = ("dataset", "data_dir", "limit", "val_fraction", "test_limit", "model", "dtype",
             "seed", "batch_size", "epochs", "save")
_RECIPE_FLAGS = ("model", "optimizer", "lr", "momentum", "weight_decay", "schedule", "warmup",
                 "batch_size")


def _fill_recipe(args):
    """Flags not given take the recipe's values."""
    from . import models

    for key, value in models.RECIPES[args.recipe].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _optimizer_and_schedule(args, batches_per_epoch):
    from . import optim

    if args.optimizer == "sgd":
        opt = optim.SGD(args.lr, momentum=args.momentum, nesterov=args.nesterov,
                        weight_decay=args.weight_decay)
    else:
        if args.momentum or args.nesterov:
            raise ValueError(f"--momentum and --nesterov are for --optimizer sgd, not "
                             f"{args.optimizer}")
        opt = optim.OPTIMIZERS[args.optimizer](args.lr, weight_decay=args.weight_decay)
    total = args.epochs * batches_per_epoch
    if args.warmup is None:
        args.warmup = int(round(args.warmup_fraction * total))
    if args.schedule == "cosine":
        schedule = optim.Cosine(max(total - args.warmup, 1), per="batch")
    elif args.schedule == "step":
        if args.warmup:
            raise ValueError("--warmup counts batches and --schedule step epochs: use --schedule "
                             "cosine or constant with --warmup")
        schedule = optim.StepDecay(args.step_size, args.gamma)
    else:
        schedule = optim.Constant(per="batch")
    if args.warmup:
        schedule = optim.WarmupThen(args.warmup, schedule)
    return opt, (None if isinstance(schedule, optim.Constant) else schedule)


def _resume_run(args):
    """Take the run's settings from the checkpoint named by --resume."""
    from .network import ConvNet
    from .training import load_checkpoint

    given = [f"--{k.replace('_', '-')}" for k in _RECIPE_FLAGS if getattr(args, k) is not None]
    if given or args.recipe != "seed" or args.dataset is not None:
        raise ValueError(f"--resume continues the saved run with its own data and recipe; "
                         f"leave out {', '.join(given) or '--recipe/--dataset'}")
    net, state, _ = load_checkpoint(ConvNet, args.resume)
    run = state.get("run")
    if not isinstance(run, dict) or set(_RUN_KEYS) - set(run):
        raise ValueError(f"{args.resume} was not written by 'fastcnn train --checkpoint'")
    epochs, save = args.epochs, args.save
    for key in _RUN_KEYS:
        setattr(args, key, run[key])
    args.image_size = run.get("image_size")  # (runs of earlier versions have none)
    args.epochs = epochs or args.epochs
    args.save = save or args.save
    if args.checkpoint is None:
        args.checkpoint = args.resume
    return net, state


def _add_training_args(train):
    r = train.add_argument_group(
        "recipe", "--recipe sets the defaults of the flags below (seed: simple model, plain SGD "
                  "0.05, batch 10, 5 epochs; modern: BatchNorm model, AdamW 2e-3 with weight "
                  "decay 1e-4, batch 64, 5 epochs, a warm-up over the first 3%% of the batches "
                  "then a cosine decay); "
                  "any flag given overrides its recipe's value")
    r.add_argument("--recipe", default="seed", choices=RECIPE_NAMES,
                   help="the defaults to start from (default: %(default)s)")
    r.add_argument("--model", choices=MODELS,
                   help="simple and complex: the seed's two CNNs; modern: complex with BatchNorm "
                        "after every convolution and Dropout before the last layer")
    r.add_argument("--epochs", type=_positive_int, help="passes over the training images")
    r.add_argument("--optimizer", choices=OPTIMIZER_NAMES,
                   help="sgd (plain, or with --momentum), adam, or adamw (decoupled weight decay)")
    r.add_argument("--lr", type=_positive_float, help="learning rate (the schedule's peak)")
    r.add_argument("--momentum", type=_fraction, help="SGD momentum in [0, 1)")
    r.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    r.add_argument("--weight-decay", type=_checked(float, lambda v: v >= 0, ">= 0", "a number"),
                   help="L2 weight decay (sgd, adam) or decoupled decay (adamw)")
    r.add_argument("--schedule", choices=SCHEDULE_NAMES,
                   help="learning-rate schedule: constant; step (times --gamma every "
                        "--step-size epochs); cosine (down to 0 over the whole run, per batch)")
    r.add_argument("--step-size", type=_positive_int, default=2,
                   help="epochs between decays of --schedule step (default: %(default)s)")
    r.add_argument("--gamma", type=_positive_float, default=0.1,
                   help="decay factor of --schedule step (default: %(default)s)")
    r.add_argument("--warmup", type=_checked(int, lambda v: v >= 0, ">= 0"),
                   help="batches of linear warm-up from 0.1 x --lr before the schedule "
                        "(default: the recipe's, 0 or 3%% of the run)")
    c = train.add_argument_group("checkpoints")
    c.add_argument("--checkpoint", metavar="PATH",
                   help="write a checkpoint here after every epoch (and on Ctrl-C)")
    c.add_argument("--resume", metavar="PATH",
                   help="continue the run saved in this checkpoint: the same data and recipe, "
                        "to --epochs in all (default: the run's own); it keeps checkpointing "
                        "there unless --checkpoint says otherwise")
    c.add_argument("--early-stopping", type=_positive_int, metavar="PATIENCE",
                   help="stop when the validation loss has not improved for PATIENCE epochs, "
                        "keeping the best weights")
    a = train.add_argument_group("augmentation and normalisation")
    a.add_argument("--normalize", action="store_true", default=None,
                   help="normalise every image per channel by the training images' mean and "
                        "standard deviation (kept in the saved model; resnet recipe: on)")
    a.add_argument("--augment", type=_augment_spec, metavar="SPEC",
                   help="move and/or mirror every training image anew each batch: crop (up to "
                        "4 pixels each way; crop=N for N), flip (left-right; not for digits), "
                        "or crop,flip (default: none)")


def _image_size(text):
    import argparse

    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW or N (pixels), got {text!r}")
    return size


def _augment_spec(text):
    import argparse

    from .augment import Augment

    try:
        return str(Augment.parse(text))
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_train_parser(subparsers):
    train = subparsers.add_parser("train", help="train a model and report its test accuracy",
                           description="Train a model, validate it every epoch and report its "
                                       "test accuracy.")
    _add_data_args(train, "images per training step (default: the recipe's, 10 or 64)")
    _add_training_args(train)
    train.add_argument("--seed", type=_seed, default=0,
                       help="seed for weights, shuffling and dropout (default: %(default)s)")
    train.add_argument("--limit", type=_positive_int, help="train on the first N training images")
    train.add_argument("--test-limit", type=_positive_int,
                       help="test on the first N test images (default: all; 200 on naive)")
    train.add_argument("--image-size", type=_image_size, metavar="HxW",
                       help="--dataset folder: resize every picture to H x W (or N x N for "
                            "N); without it they must all have one size")
    train.add_argument("--val-fraction", type=_fraction, default=0.1,
                       help="fraction of the training images held out for validation "
                            "(default: %(default)s)")
    train.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                       help="precision of parameters and activations (default: %(default)s)")
    train.add_argument("--save", metavar="PATH", help="write the trained model (.npz) here, and "
                                                      "its history beside it (.history.json, "
                                                      ".history.csv)")
    train.add_argument("--distributed", action="store_true",
                       help="one of K processes started by 'mpirun -n K': each trains on its "
                            "shard of every global batch of K x --batch-size images, gradients "
                            "averaged before every step (needs the mpi extra)")
    train.add_argument("--plot", metavar="DIR", help="after training, write the pictures of "
                       "'fastcnn plot' and the history into folder DIR (needs matplotlib)")
    train.set_defaults(func=cmd_train)


def cmd_train(args):
    import time

    from . import backend, datasets, models, threads

    resumed = state = None
    if args.resume:
        resumed, state = _resume_run(args)
    else:
        args.dataset = args.dataset or "mnist-sample"
        _fill_recipe(args)
    _check_train_outputs(args)
    _apply_compute_args(args)
    dp = _data_parallel(args)
    (x_train, y_train), val, (x_test, y_test) = _train_data(args)
    if resumed is not None:
        net, opt, schedule = resumed, None, None
        done = f" | resuming after epoch {state['epoch']}" + (
            f", batch {state['batch']}" if state["batch"] else "")
    else:
        classes = max(int(y_train.max()) + 1,
                      len(datasets.class_names(args.dataset, args.data_dir) or ()))
        net = models.build(args.model, dtype=args.dtype, seed=args.seed,
                           input_shape=x_train.shape[1:], classes=classes)
        if args.normalize:
            net.set_normalization(x=x_train)
        opt, schedule = _optimizer_and_schedule(args, -(-len(x_train) // args.batch_size))
        done = ""
    # saved with the model (and its checkpoints): what its outputs mean
    net.dataset = args.dataset
    net.class_names = datasets.class_names(args.dataset, args.data_dir)
    if args.plot and dp.is_root:
        _check_folder(args.plot)
    held_out = f", {len(val[0])} validation" if val else ""
    print(f"fastcnn {__version__} | backend {backend.get_backend()} | model {args.model} "
          f"({net.num_params():,} parameters, {args.dtype}) | {args.dataset}: "
          f"{len(x_train)} training{held_out}, {len(x_test)} test images{done}", flush=True)
    if args.distributed:
        print(f"distributed: {dp.size} processes x {threads.get_num_threads()} threads, "
              f"global batch {dp.size} x {args.batch_size} = {dp.size * args.batch_size}",
              flush=True)
    if resumed is None and (args.recipe != "seed" or args.optimizer != "sgd" or schedule):
        extras = "".join([f", augment {args.augment}" if args.augment not in (None, "none")
                          else "", ", per-channel normalisation" if args.normalize else ""])
        print(f"recipe: {opt!r}, schedule {schedule!r}, batch {args.batch_size}, "
              f"{args.epochs} epochs{extras}", flush=True)
    run = {key: getattr(args, key) for key in _RUN_KEYS}
    run["image_size"] = args.image_size
    start = time.perf_counter()
    record = net.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
                     optimizer=opt, schedule=schedule, validation_data=val, seed=args.seed,
                     verbose=True, checkpoint=args.checkpoint, resume=args.resume,
                     early_stopping=args.early_stopping, run_info=run, distributed=dp,
                     augment=None if args.augment in (None, "none") else args.augment)
    trained = time.perf_counter() - start
    if dp.is_root:  # rank 0 alone tests, saves and reports
        _test_and_save(args, net, record, run, (x_test, y_test), trained, dp.size)
    return 0


def _check_train_outputs(args):
    """Every path train will write is checked now, not after the training: each can be
    written, and no two are the same file (one would overwrite the other)."""
    from pathlib import Path

    from . import atomic, history, plots, serialize

    if args.save:
        serialize.check_destination(args.save)
    if args.checkpoint:
        atomic.check_destination(args.checkpoint, "checkpoint")
    outputs = []
    if args.save:
        json_path, csv_path = history.paths_beside(args.save)
        for path in (json_path, csv_path):
            atomic.check_destination(path, "history")
        outputs += [(args.save, "--save"), (json_path, "--save's history"),
                    (csv_path, "--save's history")]
    if args.checkpoint:
        outputs.append((args.checkpoint, "--checkpoint"))
    if args.plot:
        plots.check_available()
        outputs.append((args.plot, "--plot's folder"))
        outputs += [(Path(args.plot) / name, f"--plot's {name}")
                    for name in ("history.json", "history.csv", *plots.FILES)]
    _refuse_collisions(outputs)


def _refuse_collisions(outputs):
    """``outputs``: (path, what writes it); two that are one file are a ValueError."""
    seen = {}
    for path, what in outputs:
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(f"{seen[real]} and {what} would both write {path}: give each "
                             f"its own path")
        seen[real] = what


def _train_data(args):
    """(training, validation or None, test) pairs of images and labels, as the flags say."""
    import numpy as np

    from . import backend, datasets

    (x, y), (x_test, y_test) = datasets.load(args.dataset, args.data_dir, raw=True,
                                             size=args.image_size)
    if args.dataset == "folder":  # a tree lists its pictures class by class: shuffle the
        order = np.random.default_rng(0).permutation(len(x))  # held-out part's choice
        x, y = x[order], y[order]
    (x_train, y_train), val = _split(x, y, args.limit, args.val_fraction)
    if len(x_train) == 0:
        raise ValueError(f"no training images left: --limit {args.limit} with --val-fraction "
                         f"{args.val_fraction} holds them all out")
    if args.early_stopping and val is None:
        raise ValueError("--early-stopping watches the validation loss: --val-fraction must be "
                         "above 0")
    test_limit = args.test_limit or (200 if backend.get_backend() == "naive" else None)
    return (x_train, y_train), val, (x_test[:test_limit], y_test[:test_limit])


def _test_and_save(args, net, record, run, test, trained, processes):
    """After training: the test accuracy, the model and its history (--save), the pictures
    (--plot)."""
    from pathlib import Path

    from . import backend, datasets, history, plots

    x_test, y_test = test
    result = net.evaluate(x_test, y_test)
    config = {**run, **{k: getattr(args, k, None) for k in ("recipe", *_RECIPE_FLAGS,
                                                            "augment", "normalize")},
              "backend": backend.get_backend(), "resumed_from": args.resume,
              "test_accuracy": result["accuracy"], "test_loss": result["loss"],
              "test_images": len(x_test), "processes": processes}
    if args.save:
        net.save(args.save)
        json_path, csv_path = history.paths_beside(args.save)
        history.save(record, json_path, csv_path, config)
        print(f"saved the model to {args.save} (history: {json_path}, {csv_path.name})")
    print(f"test accuracy {result['accuracy']:.2%} (loss {result['loss']:.4f}, "
          f"{len(x_test)} images) after {trained:.1f} s of training")
    if args.plot:
        folder = Path(args.plot)
        history.save(record, folder / "history.json", folder / "history.csv", config)
        written = plots.save_all(net, x_test, y_test, folder, history=record,
                                 class_names=datasets.class_names(args.dataset, args.data_dir))
        print(f"wrote {len(written)} pictures and the history to {folder}/: "
              + ", ".join(p.name for p in written))


def _data_parallel(args):
    """--distributed: this process's DataParallel (threads: this machine's cores shared among
    its ranks, unless --threads; rank > 0 prints nothing on stdout); else a SingleProcess.
    Without it, a launch by mpirun of several processes is an error: each would train the
    whole model alone."""
    from . import distributed, threads

    if not args.distributed:
        k = distributed.launched_size()
        if k > 1:
            if distributed.launched_rank() != 0:
                import time

                # rank 0 says why; exiting first would let mpirun end the job before it does
                time.sleep(3)
                raise SystemExit(1)
            raise ValueError(f"this is one of {k} processes started by an MPI launcher: add "
                             "--distributed to train one model together (without it, each "
                             "would train its own)")
        return distributed.SingleProcess()
    dp = distributed.DataParallel()
    if not args.threads:
        threads.set_num_threads(dp.threads())
    if not dp.is_root:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's lifetime)
    return dp


def _check_folder(folder):
    """The folder for pictures: created now (with its parents), or an error naming it."""
    from pathlib import Path

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot write pictures into {folder}: it is a file")
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write pictures into {folder}: no permission")


def _history_beside(model_path, explicit=None):
    """(history, config) from --history or the file beside the model; (None, {}) if none."""
    from pathlib import Path

    from . import history

    path = Path(explicit) if explicit else history.paths_beside(model_path)[0]
    if not path.is_file():
        if explicit:
            raise FileNotFoundError(f"no history file at {path}")
        return None, {}
    return history.load(path)


def _add_plot_parser(subparsers):
    plot = subparsers.add_parser(
        "plot", help="pictures of a trained model: learning curves, confusion matrix, ...",
        description="Write PNGs of a saved model: its learning curves (from the history "
                    "written beside it), the confusion matrix and misclassified images on the "
                    "test set, the first convolution's filters and the feature maps of one test "
                    "image. Needs matplotlib (pip install -e \".[plot]\").")
    plot.add_argument("model", help="model file written by 'fastcnn train --save'")
    plot.add_argument("--history", metavar="PATH", help="history JSON (default: the one beside "
                                                        "the model, if any)")
    plot.add_argument("--out", metavar="DIR", default="plots",
                      help="folder for the PNGs (default: %(default)s)")
    plot.add_argument("--image", type=int, default=0, metavar="INDEX",
                      help="test image whose feature maps are drawn (default: %(default)s)")
    plot.add_argument("--test-limit", type=_positive_int, help="use the first N test images")
    _add_data_args(plot, None)
    plot.set_defaults(func=cmd_plot)


def cmd_plot(args):
    from . import datasets, plots
    from .network import ConvNet

    plots.check_available()
    _check_folder(args.out)
    _apply_compute_args(args)
    net = ConvNet.load(args.model)
    record, config = _history_beside(args.model, args.history)
    dataset = args.dataset or net.dataset or config.get("dataset") or "mnist-sample"
    data_dir = args.data_dir or config.get("data_dir")
    _, (x_test, y_test) = datasets.load(dataset, data_dir, raw=True, size=net.input_shape[1:])
    x_test, y_test = x_test[: args.test_limit], y_test[: args.test_limit]
    written = plots.save_all(net, x_test, y_test, args.out, history=record,
                             class_names=net.class_names or datasets.class_names(dataset, data_dir),
                             image_index=args.image)
    if record is None:
        print(f"no history beside {args.model} (train with --save to keep one): no learning "
              "curves")
    for path in written:
        print(path)
    return 0


def _add_predict_parser(subparsers):
    predict = subparsers.add_parser(
        "predict", help="the model's top classes for your own pictures (PNG, JPEG, ...)",
        description="Read each picture (needs Pillow: pip install -e \".[image]\"), prepare it "
                    "as the training images were made (digits: light ink on black, cropped to "
                    "the ink, fitted in 20x20 and centred by centre of mass in 28x28) and print "
                    "the most likely classes with their probabilities.")
    predict.add_argument("model", help="model file written by 'fastcnn train --save'")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="picture files")
    predict.add_argument("--top", type=_positive_int, default=3,
                         help="how many classes to show (default: %(default)s)")
    predict.add_argument("--style", choices=PICTURE_STYLES,
                         help="how to prepare the picture (default: photo for a colour model, "
                              "else from the dataset the model was trained on; else digit): "
                              "photo scales the whole picture to the model's input")
    predict.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                         help="dark ink on light paper is inverted (default: %(default)s: "
                              "decided from the picture's border)")
    predict.add_argument("--show-input", metavar="DIR",
                         help="also write what the model received for each picture, as "
                              "DIR/<picture name>.input.png")
    predict.add_argument("--classes", help="comma-separated class names (default: the "
                                           "dataset's, per the history file; else 0, 1, ...)")
    _add_compute_args(predict)
    predict.set_defaults(func=cmd_predict)


def cmd_predict(args):
    import warnings

    from . import datasets, predict
    from .network import ConvNet

    _apply_compute_args(args)
    net = ConvNet.load(args.model)
    dataset, names = net.dataset, net.class_names
    if dataset is None:  # a model file of an earlier version: its history may say
        dataset = _history_beside(args.model)[1].get("dataset")
        if names is None and dataset in datasets.CLASS_NAMES:
            names = datasets.class_names(dataset)
    if args.classes:
        names = [n.strip() for n in args.classes.split(",")]
        if len(names) != net.num_classes():
            raise ValueError(f"--classes names {len(names)} classes, the model has "
                             f"{net.num_classes()}")
    style = args.style or ("photo" if net.input_shape[0] == 3 else
                           "fashion" if dataset == "fashion-mnist" else "digit")
    invert = {"auto": "auto", "yes": True, "no": False}[args.invert]
    if args.show_input:
        _check_folder(args.show_input)
    for image in args.images:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", predict.AmbiguousBackground)
            x = predict.model_input(net, image, style=style, invert=invert)
        for warning in caught:
            print(f"{image}: note: {warning.message}", file=sys.stderr)
        if args.show_input:
            from pathlib import Path

            shown_as = Path(args.show_input) / f"{Path(image).name}.input.png"
            predict.save_input(x, shown_as)
        ranked = predict.rank(net, x, names, top=args.top)
        shown = ", ".join(f"{name} {p:.1%}" for _, name, p in ranked)
        print(f"{image}: {shown}")
    return 0


def _add_evaluate_parser(subparsers):
    evaluate = subparsers.add_parser("evaluate", help="evaluate a saved model on a test set")
    evaluate.add_argument("path", help="model file written by 'fastcnn train --save' (or a "
                                       "checkpoint)")
    _add_data_args(evaluate, "images per forward pass (default: 64)")
    evaluate.set_defaults(func=cmd_evaluate, batch_size=64)


def cmd_evaluate(args):
    from . import backend, datasets
    from .network import ConvNet

    _apply_compute_args(args)
    net = ConvNet.load(args.path)
    args.dataset = args.dataset or "mnist-sample"
    _, (x_test, y_test) = datasets.load(args.dataset, args.data_dir, raw=True,
                                        size=net.input_shape[1:])
    result = net.evaluate(x_test, y_test, batch_size=args.batch_size)
    print(f"{args.path} on {args.dataset} test ({len(x_test)} images, backend "
          f"{backend.get_backend()}): accuracy {result['accuracy']:.2%}, "
          f"loss {result['loss']:.4f}")
    return 0


def _add_summary_parser(subparsers):
    summary = subparsers.add_parser(
        "summary", help="a saved model's layers, output shapes, parameters and FLOPs",
        description="Print a saved model's layers (containers and what they hold, indented), "
                    "each one's output shape, parameter count and FLOPs per image.")
    summary.add_argument("path", help="model file written by 'fastcnn train --save' (or a "
                                      "checkpoint)")
    summary.set_defaults(func=cmd_summary)


def cmd_summary(args):
    from .network import ConvNet

    net = ConvNet.load(args.path)
    trained = f", trained on {net.dataset}" if net.dataset else ""
    print(f"{args.path}: input {net.input_shape}, {net.num_classes()} classes{trained}")
    print(net.summary())
    return 0


def _add_export_parser(subparsers):
    export = subparsers.add_parser(
        "export", help="write a saved model as ONNX, for onnxruntime and other runtimes",
        description="Write a saved model as an ONNX file (opset 17; needs pip install "
                    "'fastcnn[onnx]'): input 'images' (N, C, H, W) float32, prepared as "
                    "fastcnn prepares them (uint8 / 255, then the model's per-channel "
                    "normalisation, both in the file's metadata with the class names); output "
                    "'scores' (N, K).")
    export.add_argument("path", help="model file written by 'fastcnn train --save' (or a "
                                     "checkpoint)")
    export.add_argument("out", help="the ONNX file to write")
    export.add_argument("--softmax", action="store_true",
                        help="add a second output, 'probabilities': the scores' softmax")
    export.set_defaults(func=cmd_export)


def cmd_export(args):
    import warnings

    from . import onnx_export
    from .network import ConvNet

    net = ConvNet.load(args.path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        net.to_onnx(args.out, softmax=args.softmax)
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    outputs = "scores" + (" and probabilities" if args.softmax else "")
    print(f"wrote {args.out}: ONNX opset {onnx_export.OPSET}, input images (N, "
          f"{', '.join(map(str, net.input_shape))}) float32, output {outputs} (N, "
          f"{net.num_classes()}){'; ' + _preparation(net)}")
    return 0


def _preparation(net):
    steps = "pixels / 255"
    if net.normalization is not None:
        steps += ", then (x - mean) / std per channel"
    return f"prepare images as {steps} (metadata_props say so)"


def _add_import_parser(subparsers):
    imp = subparsers.add_parser(
        "import", help="read an ONNX model (fastcnn's own exports, the same layers from "
                       "PyTorch) into a fastcnn model file",
        description="Read an ONNX model made of the layers fastcnn has (Conv, Relu, MaxPool, "
                    "AveragePool, GlobalAveragePool, Flatten, Gemm, BatchNormalization, "
                    "residual Adds) and save it as a fastcnn model file; any other operator is "
                    "an error naming it and its node.")
    imp.add_argument("path", help="the ONNX file")
    imp.add_argument("out", help="the fastcnn model file (.npz) to write")
    imp.set_defaults(func=cmd_import)


def cmd_import(args):
    from . import serialize
    from .network import ConvNet

    serialize.check_destination(args.out)
    net = ConvNet.from_onnx(args.path)
    net.save(args.out)
    names = ""
    if net.class_names:
        more = ", ..." if len(net.class_names) > 5 else ""
        names = f", classes {', '.join(net.class_names[:5])}{more}"
    print(f"wrote {args.out}: {len(net.layers)} layers, {net.num_params():,} parameters, input "
          f"{net.input_shape}, {net.num_classes()} classes{names}")
    return 0


def _add_bench_parser(subparsers):
    bench = subparsers.add_parser(
        "bench", help="training and inference speed of each backend (and PyTorch, if installed)",
        description="Train each backend (and PyTorch CPU, when installed) on the same model, "
                    "batch, threads and data, interleaved in one run; report images/s, epoch "
                    "time, peak memory, Numba's compile time and the ratios against PyTorch.")
    bench.add_argument("--model", nargs="+", default=["simple"], choices=MODELS,
                       help="models to measure (default: simple)")
    bench.add_argument("--batch-size", nargs="+", type=_positive_int, default=[10],
                       help="batch sizes to measure (default: 10)")
    bench.add_argument("--backend", nargs="+", default=["numpy", "numba"],
                       choices=BACKENDS,
                       help="backends to measure (default: numpy numba; naive is opt-in: it "
                            "runs one batch, which takes minutes on the complex model)")
    bench.add_argument("--threads", type=_positive_int,
                       help="threads for every engine, PyTorch included (default: all cores)")
    bench.add_argument("--rounds", type=_positive_int, default=3,
                       help="rounds of interleaved measurements; the median is reported "
                            "(default: %(default)s)")
    bench.add_argument("--seconds", type=_positive_float, default=2.0,
                       help="about how long each engine trains (and infers) per round")
    bench.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    bench.add_argument("--no-compile-time", action="store_true",
                       help="skip timing Numba's cold and cached start (two extra processes)")
    bench.add_argument("--json", metavar="PATH", help="write the results as JSON")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    bench.add_argument("--from-json", metavar="PATH",
                       help="measure nothing: show the tables (and --plot the chart) of the "
                            "results a --json run wrote")
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args):
    import json
    import time

    from . import atomic, benchmark, threads

    if args.threads and args.threads > threads.max_threads():
        raise ValueError(f"--threads must be at most {threads.max_threads()}")
    for path in (args.json, args.plot):  # before the benchmark, not after it
        if path:
            atomic.check_destination(path, "results")
    _refuse_collisions([(p, f) for p, f in ((args.json, "--json"), (args.plot, "--plot")) if p])
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--plot needs matplotlib: pip install 'fastcnn[plot]' (or leave "
                              "out --plot)") from None
    progress = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.from_json:
        with open(args.from_json, "rb") as f:
            meta, results = benchmark.from_json(json.load(f), args.from_json)
        machine = meta.get("cpu", "an unrecorded CPU")
        print(f"fastcnn {meta.get('fastcnn', '?')} bench on {machine}, "
              f"{meta.get('time', 'at an unrecorded time')} (from {args.from_json})")
    else:
        results = benchmark.run(args.model, args.batch_size, args.backend, args.threads,
                                args.rounds, args.seconds, use_torch=not args.no_torch,
                                compile_time=not args.no_compile_time, progress=progress)
        machine = f"{_cpu_model()}, {os.cpu_count()} logical cores"
        print(f"fastcnn {__version__} bench on {machine}")
    for result in results:
        print()
        print(benchmark.format_table(result))
    if args.json and not args.from_json:
        meta = {"fastcnn": __version__, "cpu": machine, "argv": sys.argv[1:],
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        text = json.dumps(benchmark.to_json(results, meta), indent=2)
        atomic.atomic_write(args.json, lambda f: f.write(text.encode()))
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


def _add_info_parser(subparsers):
    info = subparsers.add_parser("info", help="version, backends, threads, CPU")
    info.add_argument("--threads", type=_positive_int, help="show the effect of --threads N")
    info.set_defaults(func=cmd_info)


def _quota_note(quota):
    return "" if quota is None else f", cgroup CPU quota {quota} core{'s' if quota > 1 else ''}"


def cmd_info(args):
    import platform

    import numba
    import numpy as np

    from . import backend, memory, threads

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
        ("CPU", f"{_cpu_model()} ({os.cpu_count()} logical cores; this process may use "
                f"{threads.available_cores()}{_quota_note(threads.cpu_quota())})"),
        ("memory", memory.apply_once()),
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

        memory.apply_once()
        return args.func(args)
    except KeyboardInterrupt:
        print("fastcnn: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends in one line, as promised
        if debug:
            import traceback

            traceback.print_exc()
        dist = sys.modules.get("fastcnn.distributed")
        dp = dist.current() if dist else None
        if dp is not None and dp.size > 1:  # one message, and no rank left waiting
            dp.end_job(e)
        text = str(e) if isinstance(e, _EXPECTED) and str(e) else f"{type(e).__name__}: {e}"
        hint = "" if debug or isinstance(e, _EXPECTED) else f" (set {DEBUG_VAR}=1 for details)"
        print(f"fastcnn: error: {text}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
