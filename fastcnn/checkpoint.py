"""Checkpoints: what ``fit(checkpoint=...)`` writes after every epoch (and on Ctrl-C) so that a
run resumes exactly, and how one is read back, trusted no more than a model file.

A checkpoint is a model file (``fastcnn.serialize``) whose architecture record also holds a
"checkpoint" record (``write``'s ``state``: epoch, batch within the epoch, step count, optimizer
record, schedule, random generator states, the history so far, the divergence watch, early
stopping's state, a fingerprint of the training data) and whose extra members hold the
optimizer's state ("optimizer.<param>.<key>"), the epoch's order when it was written mid-epoch
("order") and early stopping's best weights ("best.<name>"). ``ConvNet.load`` reads it as the
model it holds (``fastcnn evaluate`` works on a checkpoint); ``read`` reads the rest too.

``read`` checks, before anything in the file is used: every field of the record (type, range,
finite), the fields against each other (the step count is the epochs and batches done, the
history has one entry per epoch and one loss per step, the learning rate is the one the
schedule gives there, early stopping's state fits its patience), the optimizer's record (a
known optimizer with valid settings), the random generators' states, and every extra member's
``.npy`` header against the shape and dtype it must have (a parameter's, the data's size) before
the member is read, then its values (finite; the order a permutation). Every failure is one
ValueError naming the file and the field.
"""

from __future__ import annotations

import math

import numpy as np

from . import atomic, serialize
from .augment import Augment
from .history import EPOCH_COLUMNS
from .optim import optimizer_from_record, schedule_from_config
from .serialize import Invalid

HISTORY_KEYS = (*EPOCH_COLUMNS, "batch_loss")  # the lists of fit's history
# the per-epoch lists of the history (the rest: "lr", one per epoch begun; "batch_loss", one per
# step); the validation ones are empty when the run has no validation data
_PER_EPOCH = ("loss", "accuracy", "seconds", "images_per_second", "threads")
_VALIDATION = ("val_loss", "val_accuracy")
_RECORD_KEYS = {"epoch", "batch", "steps", "epochs", "batch_size", "shuffle", "optimizer",
                "schedule", "rng", "layer_rngs", "history", "partial", "watch", "patience",
                "stopped_early", "best", "data", "run", "processes", "batches", "augment"}
# absent from checkpoints of earlier versions ("augment": also from runs without augmentation)
_OPTIONAL_KEYS = {"run", "processes", "batches", "augment"}


def write(path, net, state, optimizer_arrays, order=None, best=None):
    """Write a checkpoint atomically: ``net``'s model file with the record ``state`` and the
    arrays of the optimizer (by "<param>.<key>"), the epoch's order, early stopping's best
    weights (by name)."""
    arrays = serialize.model_arrays(net, {"checkpoint": state})
    arrays.update({f"optimizer.{k}": a for k, a in optimizer_arrays.items()})
    if order is not None:
        arrays["order"] = order
    arrays.update({f"best.{k}": a for k, a in (best or {}).items()})
    atomic.check_destination(path, "checkpoint")
    atomic.atomic_write(path, lambda f: np.savez(f, **arrays))


def read(cls, path):
    """(network, state, arrays) from a checkpoint: the network (a ``cls``, as ``cls.load``
    makes it) with its weights and buffers, the checked "checkpoint" record, and the arrays
    "order", "optimizer.<param>.<key>" and "best.<name>"."""
    net, (state, arrays) = serialize.load(cls, path, extra=_read_rest,
                                          kind="checkpoint")
    return net, state, arrays


def _full_batches(state):
    """Global batches the images make in one epoch, the last one maybe short."""
    return -(-state["data"]["n"] // (state["batch_size"] * state.get("processes", 1)))


def batches_per_epoch(state):
    """Global batches in one epoch of the run that wrote ``state`` (one fewer than the images
    make when a last batch too small for the model was folded into the one before)."""
    return state.get("batches", _full_batches(state))


def _read_rest(z, arch, members, net):
    state = arch.get("checkpoint")
    if not isinstance(state, dict):
        raise Invalid("it is a model file (it has no checkpoint record): resume from the file "
                      "that fit(checkpoint=...) or fastcnn train --checkpoint wrote")
    _check_record(state, net)
    expected = _expected_members(state, net)
    arrays = {}
    for name, info in members.items():
        key = name[: -len(".npy")]
        if key not in expected:
            raise Invalid(f"it holds a member the checkpoint record does not call for: {name!r}")
        shape, dtype = expected.pop(key)
        serialize.check_header(z, info, key, shape, dtype, "the checkpoint record")
        arrays[key] = serialize.read_member(z, info, key)
    required = [k for k in expected if k != "order" or state["batch"] > 0]
    if required:
        raise Invalid(f"it lacks {len(required)} arrays that its record calls for, e.g. "
                      f"{required[0]!r}")
    _check_order(arrays.get("order"), state)
    return state, arrays


# -- the record -----------------------------------------------------------------------------


def _field(record, key, where):
    if key not in record:
        raise Invalid(f"its checkpoint record has no {where}{key}")
    return record[key]


def _int(record, key, lo=None, hi=None, where=""):
    value = _field(record, key, where)
    if type(value) is not int or (lo is not None and value < lo) or (
            hi is not None and value > hi):
        bounds = f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise Invalid(f"{where}{key} must be an int{bounds}, got {value!r}")
    return value


def _number(value, name, lo=None, hi=None):
    if type(value) not in (int, float) or not math.isfinite(value) or (
            lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise Invalid(f"{name} must be a finite number{bounds}, got {value!r}")
    return value


def _typed(record, key, kind, where=""):
    value = _field(record, key, where)
    if not isinstance(value, kind):
        names = {dict: "an object", list: "a list", bool: "true or false", str: "a string"}
        raise Invalid(f"{where}{key} must be {names.get(kind, kind.__name__)}, got "
                      f"{str(value)[:60]!r}")
    return value


def _check_record(state, net):
    unknown = set(state) - _RECORD_KEYS
    missing = _RECORD_KEYS - _OPTIONAL_KEYS - set(state)
    if unknown or missing:
        raise Invalid(f"its checkpoint record has unknown fields {sorted(unknown)} and lacks "
                      f"{sorted(missing)}" if unknown else
                      f"its checkpoint record lacks {', '.join(sorted(missing))}")
    epochs = _int(state, "epochs", 1)
    _int(state, "batch_size", 1)
    if "processes" in state:
        _int(state, "processes", 1)
    _typed(state, "shuffle", bool)
    _check_data(state, net)
    if "batches" in state:
        _int(state, "batches", max(1, _full_batches(state) - 1), _full_batches(state))
    steps_per_epoch = batches_per_epoch(state)
    epoch = _int(state, "epoch", 0, epochs)
    batch = _int(state, "batch", 0, steps_per_epoch - 1)
    if epoch == epochs and batch:
        raise Invalid(f"batch is {batch} after the last epoch ({epochs}) has ended")
    steps = _int(state, "steps", 0)
    if steps != epoch * steps_per_epoch + batch:
        raise Invalid(f"steps is {steps}, but {epoch} epochs of {steps_per_epoch} batches and "
                      f"{batch} more make {epoch * steps_per_epoch + batch}")
    optimizer = _check_optimizer(state, steps)
    _check_history(state)
    _check_schedule(state, optimizer, steps_per_epoch)
    _check_generators(state, net)
    _check_partial(state, steps_per_epoch)
    _check_watch(state, net)
    _check_early_stopping(state)
    if "augment" in state:
        _check_augment(state)


def _check_augment(state):
    record = _typed(state, "augment", dict)
    if set(record) != {"spec", "key"}:
        raise Invalid(f"augment must hold spec and key, got {sorted(record)}")
    spec = _typed(record, "spec", str, "augment.")
    try:
        made = Augment.parse(spec)
    except (TypeError, ValueError) as e:
        raise Invalid(f"augment.spec: {e}") from None
    if made is None:
        raise Invalid(f"augment.spec {spec!r} augments nothing")
    _int(record, "key", 0, 2**63 - 1, where="augment.")


def _check_data(state, net):
    data = _typed(state, "data", dict)
    n = _int(data, "n", 1, where="data.")
    shape = _typed(data, "shape", list, "data.")
    if tuple(shape) != tuple(net.input_shape):
        raise Invalid(f"data.shape is {shape}, but the model takes {list(net.input_shape)}")
    _typed(data, "dtype", str, "data.")
    _int(data, "labels_crc32", 0, 2**32 - 1, where="data.")
    return n


def _check_optimizer(state, steps):
    record = _typed(state, "optimizer", dict)
    try:
        optimizer = optimizer_from_record(record)
    except (TypeError, ValueError, AttributeError) as e:
        raise Invalid(f"optimizer: {e}") from None
    opt_steps = _int(record, "steps", steps, where="optimizer.")  # it may have run before
    _number(_field(record, "lr", "optimizer."), "optimizer.lr", lo=0)
    if record["lr"] <= 0:
        raise Invalid(f"optimizer.lr must be positive, got {record['lr']!r}")
    optimizer.steps = opt_steps
    return optimizer


def _check_schedule(state, optimizer, steps_per_epoch):
    """The schedule must build and give the learning rates the record says were in force: at
    each epoch's first step (the history) and at the last step (the optimizer's). Without a
    schedule the rate never changed. A schedule dropped or changed in the file shows here."""
    config = state["schedule"]
    lr, history = state["optimizer"]["lr"], state["history"]["lr"]
    if config is None:
        for i, value in enumerate(history):
            if not math.isclose(value, lr, rel_tol=1e-9):
                raise Invalid(f"history.lr[{i}] is {value!r} and optimizer.lr {lr!r}, but "
                              "schedule is null: without a schedule the rate never changes")
        return
    if not isinstance(config, dict):
        raise Invalid(f"schedule must be null or an object, got {str(config)[:60]!r}")
    try:
        schedule = schedule_from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise Invalid(f"schedule: {type(e).__name__}: {e}") from None
    per_batch = schedule.per == "batch"
    rates = [(f"history.lr[{e}]", value, e * steps_per_epoch if per_batch else e)
             for e, value in enumerate(history)]
    if state["steps"]:
        epoch, batch = state["epoch"], state["batch"]
        last = state["steps"] - 1 if per_batch else (epoch if batch else epoch - 1)
        rates.append(("optimizer.lr", lr, last))
    for name, value, at in rates:
        expected = optimizer.base_lr * schedule.factor(at)
        if not math.isclose(value, expected, rel_tol=1e-9):
            raise Invalid(f"{name} is {value!r}, but the base rate {optimizer.base_lr!r} and "
                          f"the schedule {config} give {expected!r} there")


def _pcg64_state(value, name):
    generator = np.random.Generator(np.random.PCG64())
    if not isinstance(value, dict) or value.get("bit_generator") != "PCG64":
        raise Invalid(f"{name} must be the state of a PCG64 generator, got {str(value)[:60]!r}")
    try:
        generator.bit_generator.state = value
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise Invalid(f"{name}: {e}") from None


def _check_generators(state, net):
    _pcg64_state(state["rng"], "rng")
    layer_rngs = _typed(state, "layer_rngs", dict)
    want = {path for path, layer in net.walk() if getattr(layer, "rng", None) is not None}
    if set(layer_rngs) != want:
        raise Invalid(f"layer_rngs names layers {sorted(layer_rngs)}, the model's layers with "
                      f"a generator are {sorted(want)}")
    for key, value in layer_rngs.items():
        _pcg64_state(value, f"layer_rngs.{key}")


def _check_history(state):
    history = _typed(state, "history", dict)
    if set(history) - set(HISTORY_KEYS):
        raise Invalid(f"history has unknown lists {sorted(set(history) - set(HISTORY_KEYS))}")
    epoch, steps = state["epoch"], state["steps"]
    lengths = {**{k: epoch for k in _PER_EPOCH}, "batch_loss": steps,
               "lr": epoch + (1 if state["batch"] else 0)}
    for key in HISTORY_KEYS:
        values = _typed(history, key, list, "history.")
        want = lengths.get(key)
        if key in _VALIDATION and len(values) in (0, epoch):
            want = len(values)
        if len(values) != want:
            raise Invalid(f"history.{key} has {len(values)} entries, {want} expected at epoch "
                          f"{epoch}, step {steps}")
        low = 1 if key == "threads" else 0
        high = 1 if key.endswith("accuracy") else None
        for i, v in enumerate(values):
            _number(v, f"history.{key}[{i}]", lo=None if key.endswith("loss") else low, hi=high)


def _check_partial(state, steps_per_epoch):
    partial = _typed(state, "partial", dict)
    n = state["data"]["n"]
    seen = _int(partial, "seen", 0, n, where="partial.")
    _int(partial, "correct", 0, seen, where="partial.")
    for key in ("loss", "seconds"):
        _number(_field(partial, key, "partial."), f"partial.{key}", lo=0)
    per_step = state["batch_size"] * state.get("processes", 1)
    if state["batch"] and seen != state["batch"] * per_step:
        raise Invalid(f"partial.seen is {seen}, but {state['batch']} batches of {per_step} "
                      f"images make {state['batch'] * per_step}")


def _check_watch(state, net):
    watch = _typed(state, "watch", dict)
    chance = math.log(net.num_classes()) if net.num_classes() > 1 else 1.0
    for key in ("start", "smooth"):
        value = _field(watch, key, "watch.")
        if state["steps"] == 0 and value is None:
            continue
        _number(value, f"watch.{key}", lo=0)
        if key == "start" and value < chance * (1 - 1e-9):
            raise Invalid(f"watch.start is {value!r}, below chance level {chance:.4g}")


def _check_early_stopping(state):
    patience = state["patience"]
    if patience is not None and (type(patience) is not int or patience < 1):
        raise Invalid(f"patience must be null or an int >= 1, got {patience!r}")
    best = state["best"]
    stopped = _typed(state, "stopped_early", bool)
    if best is not None:
        if patience is None or not isinstance(best, dict):
            raise Invalid(f"best is {str(best)[:60]!r} in a run without early stopping"
                          if patience is None else "best must be null or an object")
        loss = _number(_field(best, "loss", "best."), "best.loss")
        epoch = _int(best, "epoch", 1, state["epoch"], where="best.")
        val_loss = state["history"]["val_loss"]
        if len(val_loss) < epoch or val_loss[epoch - 1] != loss:
            raise Invalid(f"best.loss is {loss!r}, but the history's validation loss of epoch "
                          f"{epoch} is {val_loss[epoch - 1] if len(val_loss) >= epoch else None}")
    elif patience is not None and state["epoch"] > 0:
        raise Invalid("best is null after an epoch of a run with early stopping")
    waited = None if best is None else state["epoch"] - best["epoch"]
    if stopped and (best is None or state["batch"] or waited < patience):
        raise Invalid("stopped_early is true, but the validation loss of the last "
                      f"{patience} epochs does not say so")
    if not stopped and best is not None and not state["batch"] and waited >= patience:
        raise Invalid(f"stopped_early is false, but the validation loss has not improved for "
                      f"{waited} epochs, the patience ({patience}) or more")


# -- the members ----------------------------------------------------------------------------


def _expected_members(state, net):
    """{name: (shape, dtype)} of every extra member the record calls for ("order" among them;
    it is required only mid-epoch)."""
    params = {name: p for name, p, _ in net.parameters()}
    optimizer = optimizer_from_record(state["optimizer"])
    expected = {}
    if state["optimizer"]["steps"] > 0:
        for name, p in params.items():
            for key in optimizer.state_keys():
                expected[f"optimizer.{name}.{key}"] = (p.shape, p.dtype)
    if state["best"] is not None:
        named = {**params, **dict(net.buffers())}
        expected.update({f"best.{k}": (a.shape, a.dtype) for k, a in named.items()})
    if state["epoch"] < state["epochs"]:  # an epoch under way (or its order drawn)
        expected["order"] = ((state["data"]["n"],), np.dtype(np.int64))
    return expected


def _check_order(order, state):
    if order is None:
        return
    n = state["data"]["n"]
    if not np.array_equal(np.sort(order), np.arange(n)):
        raise Invalid(f"order is not a permutation of the {n} training images' indices")
    if not state["shuffle"] and not np.array_equal(order, np.arange(n)):
        raise Invalid("order is shuffled in a run without shuffling")
