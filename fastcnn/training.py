"""The training loop behind ``ConvNet.fit``: batches, the optimizer and schedule, divergence,
validation, early stopping, and checkpoints (``fastcnn.checkpoint``) that a run can be resumed
from exactly. One loop serves one process and the K processes of a distributed run
(``fastcnn.distributed``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import atomic, backend, checkpoint, threads
from .augment import Augment
from .checkpoint import HISTORY_KEYS
from .distributed import SingleProcess, resolve
from .kernels import _contract
from .layers import Dropout
from .optim import SGD, Optimizer, Schedule, optimizer_from_record, schedule_from_config

# Divergence: a loss that grows past DIVERGENCE_FACTOR times where it started (at least chance
# level, ln K for K classes) is divergence, not a bad batch. Batch losses are smoothed first
# (an exponential moving average with this weight on the newest) so one hard batch is not.
DIVERGENCE_FACTOR = 10.0
_SMOOTHING = 0.1
# Image values this large (in absolute value) are named when a loss goes wrong: float images
# are used as given, and 0..255 floats are the usual mistake.
_LARGE_PIXEL = 100.0


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite, or grew far past where it started.

    ``epoch`` and ``batch`` (1-based) say where; ``loss`` is the offending value.
    """

    def __init__(self, message, epoch, batch, loss):
        super().__init__(message)
        self.epoch, self.batch, self.loss = epoch, batch, loss


def pixel_note(xb):
    """A hint when a batch's values are far outside [0, 1] (uint8 batches are already scaled)."""
    top = float(np.max(np.abs(xb))) if xb.size else 0.0
    if top <= _LARGE_PIXEL:
        return ""
    return (f"; the images' values reach {top:.3g}: float images are used as given, so scale "
            f"them to about [0, 1] (uint8 images are scaled for you)")


class _DivergenceWatch:
    """Decides, batch by batch, whether training has gone wrong, and says what to do."""

    def __init__(self, classes, optimizer):
        self.chance = float(np.log(classes)) if classes > 1 else 1.0
        self.classes = classes
        self.start = self.smooth = None
        self.optimizer = optimizer

    @property
    def advice(self):
        return f"try a smaller learning rate than lr={self.optimizer.lr:g}"

    def state(self):
        return {"start": self.start, "smooth": self.smooth}

    def restore(self, state):
        self.start, self.smooth = state["start"], state["smooth"]

    def check(self, loss, epoch, batch, xb):
        """Called after every step with its loss (taken before the step's update)."""
        if self.start is None:  # the first batch
            if not np.isfinite(loss) or loss > DIVERGENCE_FACTOR * max(self.chance, 1.0):
                raise TrainingDiverged(
                    f"the loss on the first batch, before any update, is {loss:.4g} "
                    f"({self._chance()}), so the learning rate is not the cause: the images or "
                    f"the model's initial weights are far off{pixel_note(xb)}", epoch, batch,
                    loss)
            self.start = self.smooth = max(loss, self.chance)
            return
        if not np.isfinite(loss):
            raise TrainingDiverged(
                f"training diverged: the loss became {loss} at epoch {epoch}, batch {batch}; "
                f"{self.advice}{pixel_note(xb)}", epoch, batch, loss)
        self.smooth += _SMOOTHING * (loss - self.smooth)
        if self.smooth > DIVERGENCE_FACTOR * self.start:
            raise TrainingDiverged(
                f"training diverged: the loss grew to {self.smooth:.4g} (smoothed over recent "
                f"batches) at epoch {epoch}, batch {batch}, from {self.start:.4g} at the start "
                f"({self._chance()}); {self.advice}{pixel_note(xb)}", epoch, batch, loss)

    def _chance(self):
        return f"chance level for {self.classes} classes is ln {self.classes} = {self.chance:.2f}"


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


class _Averaging:
    """The gradient hook of every step of a run: the allreduce of the gradients weighted by
    this process's ``share`` of the step's global batch (set before each step; nothing to do
    for a process alone), then ``hook`` (the caller's own, if any), which so sees the
    average."""

    def __init__(self, dp, hook):
        self.dp, self.hook, self.share = dp, hook, 1.0

    def __call__(self, net):
        self.dp.allreduce_gradients(net, self.share)
        if self.hook is not None:
            self.hook(net)


def _interactive():
    """Whether someone is watching: stderr is a terminal, or this is a Jupyter kernel."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):
        pass
    # a kernel's shell, not merely ipykernel imported (a test runner that runs notebooks has)
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def _compile_notice(enabled):
    """Around the run's first batch (numba, verbose): if it takes over 2 s, say that the
    kernels are compiling (see jit_cost.CompileNotice)."""
    if not enabled:
        return contextlib.nullcontext()
    from tqdm import tqdm

    from .jit_cost import CompileNotice

    return CompileNotice(write=lambda line: tqdm.write(line, file=sys.stderr))


def _progress(total, desc, verbose):
    if not verbose:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.25)


def _batch_starts(n, batch_size, dp, net):
    """(where each global batch of an epoch starts, then n; the size of a last batch folded
    into the one before, or 0). The last batch is folded in when a process's shard of it would
    hold fewer images than the model can train on (BatchNorm of one value per channel needs
    two), and it is not the only batch."""
    per_step = batch_size * dp.size
    starts = list(range(0, n, per_step))
    last = n - starts[-1]
    shards = [len(s) for s in np.array_split(np.arange(last), dp.size) if len(s)]
    if len(starts) > 1 and min(shards) < net.min_batch_size():
        return starts[:-1] + [n], last
    return starts + [n], 0


def _fingerprint(x, y):
    """What identifies the training data cheaply: its size and the labels' CRC-32."""
    return {"n": int(len(x)), "shape": list(x.shape[1:]), "dtype": str(x.dtype),
            "labels_crc32": zlib.crc32(np.ascontiguousarray(y, dtype=np.int64).tobytes())}


class _Interrupts:
    """While active (main thread only), the first Ctrl-C sets a flag that the loop checks at
    the next batch boundary, where a consistent checkpoint can be written; a second Ctrl-C
    interrupts at once."""

    def __init__(self, enabled):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._old = None

    def __enter__(self):
        if self.enabled:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._old)  # the next Ctrl-C is the ordinary one

    def __exit__(self, *exc):
        if self.enabled:
            signal.signal(signal.SIGINT, self._old)
        return False


class _BatchMaker:
    """Each step's images, scaled, normalised and augmented, made one step ahead on a thread of
    their own, so that NumPy's copies overlap the step's kernels (which release the GIL)
    instead of adding to the step. Two buffers take turns: a step reads one while the next
    batch is written to the other. What a batch holds depends only on (epoch, batch, rank), so
    making it early or late gives the same bits."""

    def __init__(self, trainer, largest):
        self.trainer = trainer
        shape, dtype = (largest,) + trainer.x.shape[1:], trainer.net.dtype
        self.buffers = [np.empty(shape, dtype) for _ in range(2)]
        self.augmented = [np.empty(shape, dtype) for _ in range(2)] if trainer.augment else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fastcnn-batches")
        self.ahead = None  # (epoch, batch, future) of the batch being made

    def make(self, epoch, b, idx):
        t, slot = self.trainer, b % 2
        xb = t.net.prepare_batch(t.x, idx, self.buffers[slot])
        if t.augment:
            rng = np.random.default_rng([t.augment_key, epoch, b, t.dp.rank])
            xb = t.augment.apply(xb, rng, self.augmented[slot])
        return xb

    def get(self, epoch, b, idx, next_idx=None):
        """Batch ``b``'s images (made ahead if they were); starts making batch b + 1's."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[:2] == (epoch, b):
            xb = ahead[2].result()
        else:
            if ahead is not None:  # one writer at a time: let a batch not taken finish first
                ahead[2].result()
            xb = self.make(epoch, b, idx)
        if next_idx is not None:
            self.ahead = (epoch, b + 1, self.pool.submit(self.make, epoch, b + 1, next_idx))
        return xb

    def close(self):
        self.pool.shutdown(wait=True)


class Trainer:
    """One ``fit`` call's state; everything a checkpoint must hold to resume exactly."""

    def __init__(self, net, x, y, epochs, batch_size, optimizer, schedule, validation_data,
                 shuffle, seed, early_stopping, run_info=None, dp=None, augment=None):
        self.net, self.x, self.y = net, x, y
        self.dp = SingleProcess() if dp is None else dp  # one loop for one process and many
        self.epochs, self.batch_size = epochs, batch_size
        self.optimizer, self.schedule = optimizer, schedule
        self.validation_data, self.shuffle = validation_data, shuffle
        self.patience = early_stopping
        self.rng = np.random.default_rng(seed)
        self.history = {k: [] for k in HISTORY_KEYS}
        self.watch = _DivergenceWatch(net.num_classes(), optimizer)
        self.epoch = 0  # epochs completed
        self.batch = 0  # batches completed in the epoch under way
        self.steps = 0  # optimizer steps in this run
        self.order = None
        self.partial = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        self.best = None  # early stopping: {"loss", "epoch", "arrays"}
        self.run_info = run_info  # the caller's own record (the CLI's settings)
        self.stopped_early = False
        self.starts, self.folded = _batch_starts(len(x), batch_size, self.dp, net)
        # augmentation: each batch's draws come from (key, epoch, batch, rank), the key from
        # the seed (random without one; a checkpoint keeps it)
        self.augment = augment
        self.augment_key = int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0]
                               >> np.uint64(1))

    # -- the loop ---------------------------------------------------------------------------

    def run(self, verbose, checkpoint):
        net, dp = self.net, self.dp
        # numba only: its kernels give the same numbers on any thread count; OpenBLAS's (the
        # numpy backend) do not, and a tuned count would make runs differ with the timing. One
        # process alone: ranks that tuned each for itself would wait for each other.
        numba = backend.get_backend() == "numba"
        # a count chosen for this model and batch earlier in the process is where it starts
        key = (_architecture(net), str(net.dtype), self.batch_size, self.x.shape[1:])
        self.tuner = threads.tuner_for(key, enabled=numba and dp.size == 1)
        self.compile_step = self.steps if numba and verbose else None  # this run's first
        largest = -(-int(np.diff(self.starts).max()) // dp.size)  # array_split's first shard
        batches = _BatchMaker(self, largest)
        if self.folded and verbose:
            many = "s" if self.folded > 1 else ""
            print(f"note: the last {self.folded} image{many} of an epoch would make a batch too "
                  f"small for the model's BatchNorm statistics (at least "
                  f"{net.min_batch_size()} images for each process): they are trained with "
                  f"the batch before", flush=True)
        hook = net.gradient_hook
        self.averaging = net.gradient_hook = _Averaging(dp, hook)
        try:
            with _Interrupts(checkpoint is not None) as interrupts, self.tuner:
                while self.epoch < self.epochs and not self.stopped_early:
                    self._epoch(interrupts, batches, verbose, checkpoint)
        finally:
            batches.close()
            net.gradient_hook = hook
        if self.best is not None and self.best["epoch"] != self.epoch:
            for name, a in _named_arrays(net):
                a[...] = self.best["arrays"][name]
        net.eval()
        history = dict(self.history)
        if self.patience is not None:
            history["best_epoch"] = self.best["epoch"] if self.best else None
            history["stopped_epoch"] = self.epoch if self.stopped_early else None
        return history

    def _epoch(self, interrupts, batches, verbose, checkpoint):
        """The rest of the epoch under way (all of a new one), then its end: validation, early
        stopping, the epoch line, the checkpoint (rank 0 writes it)."""
        n, dp, starts = len(self.x), self.dp, self.starts
        epoch = self.epoch + 1
        if self.order is None:  # a new epoch (a resumed one keeps its saved order)
            self.order = self.rng.permutation(n) if self.shuffle else np.arange(n)
            self.partial = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        bar = _progress(n, f"epoch {epoch}/{self.epochs}", verbose)
        bar.update(self.partial["seen"])
        start = time.perf_counter()
        self.net.train()
        # a Ctrl-C on any rank, agreed at the epoch's start and then with every step's totals,
        # so that every rank stops at the same batch boundary
        _, (stop,) = dp.combine([], 0, [interrupts.requested])
        try:
            for b in range(self.batch, len(starts) - 1):
                if stop:
                    self.partial["seconds"] += time.perf_counter() - start
                    self._interrupted(checkpoint if dp.is_root else None)
                every = self.order[starts[b] : starts[b + 1]]
                after = self.order[starts[b + 1] : starts[b + 2]] if b + 2 < len(starts) else None
                stop = self._step(b, every, batches, interrupts, after)
                bar.update(len(every))
                if b % 20 == 0:
                    p = self.partial
                    bar.set_postfix(loss=f"{p['loss'] / p['seen']:.4f}", refresh=False)
        finally:
            bar.close()
        self.partial["seconds"] += time.perf_counter() - start
        self._end_epoch(epoch, verbose)
        if checkpoint is not None and dp.is_root:
            self.save(checkpoint)

    def _step(self, b, every, batches, interrupts, after=None):
        """Global batch ``b`` (indices ``every``): this process's shard of it through one
        training step, then the whole batch's loss and accuracy, and whether any process has
        been interrupted by now (returned), agreed in one collective. ``after``: the next
        batch's indices, whose images are made while this step runs."""
        net, dp, p = self.net, self.dp, self.partial
        idx = dp.shard(every)
        xb = batches.get(self.epoch, b, idx, None if after is None else dp.shard(after))
        yb = self.y[idx]
        if self.schedule is not None:
            at = self.epoch if self.schedule.per == "epoch" else self.steps
            self.optimizer.lr = self.optimizer.base_lr * self.schedule.factor(at)
        if b == 0:
            self.history["lr"].append(self.optimizer.lr)
        self.averaging.share = len(idx) / len(every)
        self.tuner.start()
        with _compile_notice(self.steps == self.compile_step):
            if len(idx):
                loss, logits = net.train_step(xb, yb, self.optimizer)
            else:  # distributed: a short last batch left this rank nothing
                loss, logits = self._empty_step()
        self.tuner.stop(len(idx))
        correct = int(np.count_nonzero(logits.argmax(axis=1) == yb))
        (loss,), (correct, stop) = dp.combine([loss], len(idx), [correct, interrupts.requested])
        self.watch.check(loss, self.epoch + 1, b + 1, xb)
        self.history["batch_loss"].append(float(loss))
        self.steps += 1
        self.batch = b + 1
        p["loss"] += loss * len(every)
        p["correct"] += int(correct)
        p["seen"] += len(every)
        return stop > 0

    def _end_epoch(self, epoch, verbose):
        net, h, p = self.net, self.history, self.partial
        bad = net.nonfinite_parameter()
        if bad:  # the last step of the epoch may have blown up after its loss was taken
            raise TrainingDiverged(
                f"training diverged at the end of epoch {epoch}: the parameters of {bad} are "
                f"no longer finite; {self.watch.advice}", epoch, self.batch, float("nan"))
        h["loss"].append(p["loss"] / p["seen"])
        h["accuracy"].append(p["correct"] / p["seen"])
        h["seconds"].append(p["seconds"])
        h["images_per_second"].append(p["seen"] / max(p["seconds"], 1e-9))
        h["threads"].append(self.tuner.most_used())
        net.eval()
        self.dp.broadcast_buffers(net)  # BatchNorm's running statistics: rank 0's, everywhere
        if self.validation_data is not None:
            val = self._validate()
            h["val_loss"].append(val["loss"])
            h["val_accuracy"].append(val["accuracy"])
        self.epoch, self.batch, self.order = epoch, 0, None
        note = ""
        if self.patience is not None:
            if self.best is None or h["val_loss"][-1] < self.best["loss"]:
                self.best = {"loss": h["val_loss"][-1], "epoch": epoch,
                             "arrays": {k: a.copy() for k, a in _named_arrays(net)}}
            elif epoch - self.best["epoch"] >= self.patience:
                self.stopped_early = True
                note = (f"  (stopping: no better validation loss for {self.patience} epochs; "
                        f"keeping epoch {self.best['epoch']}'s weights)")
        if verbose:
            line = (f"epoch {epoch}/{self.epochs}: loss {h['loss'][-1]:.4f}  "
                    f"train acc {h['accuracy'][-1]:.2%}")
            if self.validation_data is not None:
                line += f"  val loss {h['val_loss'][-1]:.4f}  val acc {h['val_accuracy'][-1]:.2%}"
            n = h["threads"][-1]
            line += (f"  {p['seconds']:.1f} s ({p['seen'] / max(p['seconds'], 1e-9):,.0f} img/s, "
                     f"{n} thread{'s' if n != 1 else ''})")
            print(line + note, flush=True)

    def _empty_step(self):
        """A distributed step on a rank whose shard is empty: zero gradients into the allreduce,
        then the same optimizer step as every other rank."""
        for _, _, grad in self.net.parameters():
            grad[...] = 0
        self.net.gradient_hook(self.net)
        self.optimizer.step(self.net)
        return 0.0, np.zeros((0, self.net.num_classes()), self.net.dtype)

    def _validate(self):
        """The validation loss and accuracy; distributed, each rank evaluates its part."""
        xv, yv = self.validation_data
        part = self.dp.part(len(xv))
        mine = [0.0, 0.0]
        if part.stop > part.start:
            result = self.net.evaluate(xv[part], yv[part], batch_size=64)
            mine = [result["loss"], result["accuracy"]]
        (loss, accuracy), _ = self.dp.combine(mine, part.stop - part.start)
        return {"loss": loss, "accuracy": accuracy}

    def _interrupted(self, checkpoint):
        if checkpoint is None:  # distributed: rank 0 writes it
            raise KeyboardInterrupt
        self.save(checkpoint)
        print(f"interrupted: wrote a checkpoint to {checkpoint} (epoch {self.epoch + 1}, after "
              f"batch {self.batch}); continue with resume={str(checkpoint)!r} "
              f"(fastcnn train --resume {checkpoint})", file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    # -- checkpoints --------------------------------------------------------------------------

    def save(self, path):
        net = self.net
        record, opt_arrays = self.optimizer.state_dict()
        layer_rngs = {path: layer.rng.bit_generator.state for path, layer in net.walk()
                      if getattr(layer, "rng", None) is not None}
        state = {
            "epoch": self.epoch, "batch": self.batch, "steps": self.steps,
            "epochs": self.epochs, "batch_size": self.batch_size, "shuffle": self.shuffle,
            "optimizer": record,
            "schedule": None if self.schedule is None else {
                "type": type(self.schedule).__name__, **self.schedule.config()},
            "rng": self.rng.bit_generator.state, "layer_rngs": layer_rngs,
            "history": self.history, "partial": self.partial, "watch": self.watch.state(),
            "patience": self.patience, "stopped_early": self.stopped_early,
            "best": None if self.best is None else {"loss": self.best["loss"],
                                                   "epoch": self.best["epoch"]},
            "data": _fingerprint(self.x, self.y), "run": self.run_info,
            "processes": self.dp.size,  # batches count K x batch_size images
            "batches": len(self.starts) - 1,  # a last batch too small is folded in
        }
        if self.augment:
            state["augment"] = {"spec": str(self.augment), "key": self.augment_key}
        # the order, once drawn, is saved: the generator has moved past it
        checkpoint.write(path, net, state, opt_arrays, self.order,
                         None if self.best is None else self.best["arrays"])

    def restore(self, path, state, arrays):
        """Continue from a checkpoint read by ``checkpoint.read`` (which checked it whole):
        first that it was written by a run like this one."""
        data = _fingerprint(self.x, self.y)
        if state["data"] != data:
            saved = state["data"]
            raise ValueError(f"{path} was written while training on other data ({saved['n']} "
                             f"images of {saved['dtype']} {saved['shape']}, this is "
                             f"{data['n']} of {data['dtype']} {data['shape']}, or other "
                             f"labels); resume with the same x and y")
        if state["batch_size"] != self.batch_size or state["shuffle"] != self.shuffle:
            raise ValueError(f"{path} was written with batch_size={state['batch_size']}, "
                             f"shuffle={state['shuffle']}; resume with the same")
        if state.get("processes", 1) != self.dp.size:
            raise ValueError(f"{path} was written by a run of {state.get('processes', 1)} "
                             f"processes; resume it with as many (this is {self.dp.size})")
        if checkpoint.batches_per_epoch(state) != len(self.starts) - 1:
            raise ValueError(f"{path} was written by a run of "
                             f"{checkpoint.batches_per_epoch(state)} batches an epoch, this one "
                             f"has {len(self.starts) - 1}")
        if state["patience"] is not None and self.validation_data is None:
            raise ValueError(f"{path} was written by a run with early stopping: resume it "
                             "with validation_data")
        self.optimizer.load_state_dict(state["optimizer"],
                                       {k[len("optimizer."):]: a for k, a in arrays.items()
                                        if k.startswith("optimizer.")})
        self.epoch, self.batch, self.steps = state["epoch"], state["batch"], state["steps"]
        self.rng.bit_generator.state = state["rng"]
        if "augment" in state:
            self.augment_key = state["augment"]["key"]
        for path, rng_state in state["layer_rngs"].items():
            self.net.layer_at(path).rng.bit_generator.state = rng_state
        self.history = {k: list(state["history"][k]) for k in HISTORY_KEYS}
        self.partial = dict(state["partial"])
        self.watch.restore(state["watch"])
        self.stopped_early = state["stopped_early"]
        self.order = arrays.get("order")
        if state["best"] is not None:
            self.best = {**state["best"], "arrays": {k[len("best."):]: a for k, a in
                                                     arrays.items() if k.startswith("best.")}}


def _named_arrays(net):
    """Every parameter and buffer, by name: what early stopping keeps."""
    yield from ((name, p) for name, p, _ in net.parameters())
    yield from net.buffers()


def load_checkpoint(cls, path):
    """(network, state, arrays) from a checkpoint written by ``fit(checkpoint=...)``: the
    network (a ``cls``) with its weights and buffers, the checked "checkpoint" record, and the
    optimizer, order and best-weights arrays (see ``fastcnn.checkpoint``). Every problem is a
    ValueError naming the file and the field."""
    return checkpoint.read(cls, path)


def _resume_into(net, resume):
    """(state, arrays) of checkpoint ``resume``, whose weights and buffers are copied into
    ``net`` (which must have the same architecture)."""
    saved, state, arrays = load_checkpoint(type(net), resume)
    if [type(layer) for layer in saved.layers] != [type(layer) for layer in net.layers] or \
            [a.shape for _, a in _named_arrays(saved)] != \
            [a.shape for _, a in _named_arrays(net)]:
        raise ValueError(f"{resume} holds another architecture than this network's")
    if saved.dtype != net.dtype:
        raise ValueError(f"{resume} holds a {saved.dtype} network and this one is {net.dtype}: "
                         f"resume with a network of the same dtype")
    for (_, a), (_, b) in zip(_named_arrays(net), _named_arrays(saved), strict=True):
        a[...] = b
    net.normalization = saved.normalization  # the run's, as its images were prepared
    return state, arrays


def _check_recipe(optimizer, lr, schedule):
    """The optimizer fit uses: ``optimizer``, or the seed's SGD with ``lr``."""
    if optimizer is None:
        optimizer = SGD(0.05 if lr is None else lr)
    elif not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a fastcnn.optim optimizer, got "
                        f"{type(optimizer).__name__}")
    elif lr is not None:
        raise ValueError("give the learning rate to the optimizer, not to fit (lr=...)")
    if schedule is not None and not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastcnn.optim schedule, got "
                        f"{type(schedule).__name__}")
    return optimizer


def _check_validation_data(net, validation_data):
    if validation_data is None:
        return
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
        got = (f"a {len(validation_data)}-tuple" if isinstance(validation_data, (tuple, list))
               else type(validation_data).__name__)
        raise ValueError(f"validation_data must be a pair (x_val, y_val), got {got}")
    net.check_data(*validation_data, what="validation_data")


def _architecture(net):
    """A short digest of the network's layers and their settings."""
    layers = json.dumps([[type(layer).__name__, layer.config()] for layer in net.layers])
    return hashlib.sha256(layers.encode()).hexdigest()[:12]


def _run_definition(net, x, y, epochs, batch_size, optimizer, schedule, validation_data,
                    shuffle, seed, early_stopping, state):
    """What every process of a distributed run must agree on, as short JSON-able values."""
    def data(x, y):
        f = _fingerprint(x, y)
        return (f"{f['n']} images of {f['dtype']} {f['shape']}, labels' CRC-32 "
                f"{f['labels_crc32']:08x}")

    return {"model": f"{len(net.layers)} layers, {net.num_params():,} parameters",
            "architecture": _architecture(net),
            "dtype": str(net.dtype), "backend": backend.get_backend(),
            "data": data(x, y), "validation data": validation_data and data(*validation_data),
            "epochs": epochs,
            "batch_size": batch_size, "shuffle": bool(shuffle), "seed": seed,
            "optimizer": repr(optimizer), "schedule": repr(schedule),
            "early_stopping": early_stopping,
            "resumed at": None if state is None else [state["epoch"], state["batch"]]}


def fit_network(net, x, y, epochs, batch_size, lr, validation_data, shuffle, seed, verbose,
                optimizer, schedule, checkpoint, resume, early_stopping, run_info=None,
                distributed=None, augment=None):
    """``ConvNet.fit`` (see its docstring)."""
    dp = resolve(distributed)
    augment = Augment.parse(augment)
    epochs = _contract.check_int("epochs", epochs, 1)
    batch_size = _contract.check_int("batch_size", batch_size, 1)
    if early_stopping is not None:
        early_stopping = _contract.check_int("early_stopping", early_stopping, 1)
        if validation_data is None:
            raise ValueError("early_stopping watches the validation loss: pass validation_data")
    if net.gradient_hook is not None and not callable(net.gradient_hook):
        raise TypeError(f"net.gradient_hook must be a function called as hook(net), or None; "
                        f"got {net.gradient_hook!r}")
    if checkpoint is not None:
        atomic.check_destination(checkpoint, "checkpoint")
    state = arrays = None
    if resume is not None:
        atomic.check_path(resume, "checkpoint to resume from")
        state, arrays = _resume_into(net, resume)
        if optimizer is None and lr is None:
            optimizer = optimizer_from_record(state["optimizer"])
        if schedule is None and state["schedule"] is not None:
            schedule = schedule_from_config(state["schedule"])
        if early_stopping is None:
            early_stopping = state["patience"]
        if run_info is None:
            run_info = state.get("run")
        saved = Augment.parse(state.get("augment", {}).get("spec"))
        if augment is not None and augment != saved:
            raise ValueError(f"{resume} was written by a run with augment={str(saved)!r}; "
                             f"resume it with the same (or leave augment out)")
        augment = saved
    optimizer = _check_recipe(optimizer, lr, schedule)
    net.check_data(x, y)
    if augment is not None:
        augment.check(x.shape[1:])
    _check_validation_data(net, validation_data)
    net.check_parameters()
    if len(x) < dp.size:
        raise ValueError(f"{len(x)} training images for {dp.size} processes: each needs at "
                         "least one")
    dp.check_agreement({**_run_definition(net, x, y, epochs, batch_size, optimizer, schedule,
                                          validation_data, shuffle, seed, early_stopping,
                                          state), "augment": str(augment)})
    seed = dp.shared_seed(seed)  # the same shuffled order on every rank
    if state is None and dp.size > 1:
        for i, (_, layer) in enumerate(net.walk()):  # masks differ between the ranks' shards
            if isinstance(layer, Dropout):
                layer.rng = np.random.default_rng([seed, dp.rank, i])
    dp.broadcast_parameters(net)
    trainer = Trainer(net, x, y, epochs, batch_size, optimizer, schedule, validation_data,
                      shuffle, seed, early_stopping, run_info, dp=dp, augment=augment)
    if state is not None:
        trainer.restore(resume, state, arrays)
    verbose = _interactive() if verbose is None else bool(verbose)
    try:
        return trainer.run(verbose and dp.is_root, checkpoint)
    except Exception as e:
        if dp.size > 1:  # else the other ranks wait in their allreduce
            dp.end_job(e)
        raise
