"""ConvNet: a stack of layers with its forward and backward passes, one training step,
prediction, evaluation and model files.

One training step is split into seams so later features slot in without touching the kernels:
forward -> loss -> backward -> gradient hook -> optimizer step (see ``train_step``). The loop
over epochs and batches that ``fit`` runs is ``fastcnn.training``'s; it uses only this class's
public methods, and nothing here imports more than its entry point.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import serialize
from .kernels import _contract
from .layers import Layer, Sequential, SoftmaxCrossEntropy, backward_chain, forward_chain
from .training import fit_network, pixel_note


class ConvNet:
    """A feed-forward network of fastcnn layers, trained with softmax cross-entropy.

    ``input_shape`` is the per-sample shape (C, H, W). When given, every ``add`` checks that the
    new layer fits what comes before it; otherwise the check runs on the first batch.
    ``dataset`` (the name of what it was trained on) and ``class_names`` (one name per class)
    are saved with the model, so that a model file says what its outputs mean.
    """

    def __init__(self, layers=None, input_shape=None):
        self.layers: list[Layer] = []
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.dataset: str | None = None
        self.class_names: tuple[str, ...] | None = None
        # per-channel (mean, std) subtracted and divided by as images are prepared (see
        # set_normalization); saved with the model, so evaluate and predict apply it too
        self.normalization: tuple[np.ndarray, np.ndarray] | None = None
        self.loss = SoftmaxCrossEntropy()
        self.gradient_hook = None  # called as hook(net) between backward and the optimizer step
        for layer in layers or ():
            self.add(layer)

    # -- building -----------------------------------------------------------------------------

    def add(self, layer):
        """Append a layer (returns self, so calls chain)."""
        if not isinstance(layer, Layer):
            raise TypeError(f"ConvNet.add takes a fastcnn layer, got {type(layer).__name__}")
        self.layers.append(layer)
        if self.input_shape is not None:
            try:
                self.output_shapes()
            except ValueError:
                self.layers.pop()
                raise
        return self

    def output_shapes(self):
        """Per-sample output shape after each layer; ValueError names the layer that won't fit."""
        if self.input_shape is None:
            raise ValueError("the network has no input_shape yet: pass input_shape= or run a batch")
        shapes, shape = [], self.input_shape
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.output_shape(shape)
            except ValueError as e:
                raise ValueError(f"layer {i} ({type(layer).__name__}): {e}") from None
            shapes.append(shape)
        return shapes

    def min_batch_size(self):
        """The fewest images a training batch can hold: 2 where a layer normalises each channel
        over the batch alone (BatchNorm of one value per channel per image), else 1."""
        shapes = [self.input_shape, *self.output_shapes()[:-1]]
        return max(layer.min_batch_size(shape)
                   for layer, shape in zip(self.layers, shapes, strict=True))

    def num_classes(self):
        """K, the length of the class-score vector the last layer gives per image; a network
        with no layers, or one whose last layer gives something else, is a ValueError."""
        if not self.layers:
            raise ValueError("the network has no layers: add some before training or predicting")
        last = self.output_shapes()[-1]
        if len(last) != 1:
            raise ValueError(f"the network's last layer gives {last} per image, not a vector of "
                             f"class scores: end it with Flatten() and a Dense layer")
        return last[0]

    @property
    def dtype(self):
        for layer in self.layers:
            for p in layer.params.values():
                return p.dtype
        return np.dtype(np.float32)

    def walk(self):
        """Every layer, containers and what they hold, depth first, as ``(path, layer)``: path
        "3" for the fourth layer, "3.block.0" for the first layer of its block."""
        def visit(path, layer):
            yield path, layer
            for name, child in layer.children():
                yield from visit(f"{path}.{name}", child)
        for i, layer in enumerate(self.layers):
            yield from visit(str(i), layer)

    def layer_at(self, path):
        """The layer at a path of ``walk``; KeyError if there is none."""
        found = dict(self.walk()).get(path)
        if found is None:
            raise KeyError(f"no layer at {path!r}")
        return found

    def parameters(self):
        """Every trainable parameter as ``(name, param, grad)``, name ``"layer<i>.<key>"`` (keys
        dotted inside containers: ``"layer3.block.0.weight"``): the one walk that optimizers,
        parameter counts and model files use (grad is None before the first backward pass)."""
        for i, layer in enumerate(self.layers):
            for key, p in layer.params.items():
                yield f"layer{i}.{key}", p, layer.grads.get(key)

    def buffers(self):
        """State saved with the model but not trained (BatchNorm's running statistics), as
        ``(name, array)``; optimizers never see these."""
        for i, layer in enumerate(self.layers):
            for key, b in layer.buffers.items():
                yield f"layer{i}.{key}", b

    def num_params(self):
        return sum(p.size for _, p, _ in self.parameters())

    # -- modes --------------------------------------------------------------------------------

    def train(self, mode=True):
        """Training mode (Dropout drops, BatchNorm uses batch statistics); returns self."""
        for layer in self.layers:
            layer.training = bool(mode)
        return self

    def eval(self):
        """Inference mode (Dropout is the identity, BatchNorm uses its running statistics)."""
        return self.train(False)

    @property
    def training(self):
        return any(layer.training for layer in self.layers)

    @contextlib.contextmanager
    def mode(self, training):
        """``with net.mode(False): ...`` runs a block in inference (or training) mode and puts
        every layer back as it was."""
        before = [layer.training for layer in self.layers]
        self.train(training)
        try:
            yield
        finally:
            for layer, mode in zip(self.layers, before, strict=True):
                layer.training = mode

    def summary(self):
        """A table of layers (containers and what they hold, indented), their per-image output
        shapes, parameter counts and FLOPs per image (2 per multiply-add), as a string."""
        rows = [("layer", "output shape", "params", "FLOPs/image")]

        def add(layer, shape, indent):
            out = None
            if shape is not None:
                out = layer.output_shape(shape)
            flops = "?" if shape is None else f"{layer.flops(shape):,}"
            params = sum(p.size for p in layer.params.values())
            rows.append(("  " * indent + repr(layer),
                         "?" if out is None else "(N, " + ", ".join(map(str, out)) + ")",
                         f"{params:,}", flops))
            if isinstance(layer, Sequential):
                inner = shape
                for child in layer.layers:
                    add(child, inner, indent + 1)
                    inner = None if inner is None else child.output_shape(inner)
            else:
                for _, child in layer.children():
                    add(child, shape, indent + 1)
            return out

        shape = self.input_shape
        for layer in self.layers:
            shape = add(layer, shape, 0)
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d:>{widths[3]}}"
                 for a, b, c, d in rows]
        lines.insert(1, "-" * len(lines[0]))
        total = "?" if self.input_shape is None else f"{self.flops():,}"
        lines.append(f"total parameters: {self.num_params():,}; FLOPs per image: {total}")
        return "\n".join(lines)

    def flops(self):
        """FLOPs (2 per multiply-add) of one image's forward pass: the convolutions, dense
        layers and residual adds."""
        shape, total = self.input_shape, 0
        if shape is None:
            raise ValueError("the network has no input_shape yet: pass input_shape= or run a batch")
        for layer in self.layers:
            total += layer.flops(shape)
            shape = layer.output_shape(shape)
        return total

    # -- forward and backward -----------------------------------------------------------------

    def _check_input(self, x):
        if isinstance(x, (list, tuple)):
            raise TypeError(f"x must be a numpy array, got a {type(x).__name__}: convert it "
                            f"with np.asarray(x)")
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"x must be a batch of images shaped (N, C, H, W), got {x.shape}"
                             f"{self._layout_hint(x.shape)}")
        if self.input_shape is None:
            self.input_shape = tuple(x.shape[1:])
            self.output_shapes()
        elif x.shape[1:] != self.input_shape:
            raise ValueError(f"x has images of shape {x.shape[1:]}, the network expects "
                             f"{self.input_shape}{self._layout_hint(x.shape)}")

    def _layout_hint(self, shape):
        """How to turn an array of ``shape`` into (N, C, H, W) images this network takes, where
        that is clear: '' where it is not."""
        want = self.input_shape
        if len(shape) == 3 and want is not None and tuple(shape) == tuple(want):
            return ": that is one image; add the batch axis with x[None]"
        if len(shape) == 3 and (want is None or want[0] == 1):
            return ": grey images without a channel axis? add it with x[:, None]"
        if len(shape) == 4 and want is not None and tuple(shape[1:]) == (want[1], want[2],
                                                                          want[0]):
            return (": channels last (N, H, W, C)? transpose with "
                    "x.transpose(0, 3, 1, 2)")
        if len(shape) == 4 and want is None and shape[3] in (1, 3, 4) and shape[1] > 4:
            return (": channels last (N, H, W, C)? transpose with "
                    "x.transpose(0, 3, 1, 2)")
        return ""

    def forward(self, x):
        """Logits (N, K) for a batch already in the network's dtype (``layers.forward_chain``:
        a Conv2D and the ReLU after it run as one where the backend has the kernels)."""
        return forward_chain(self.layers, x)

    def backward(self, dlogits):
        """Fill every layer's grads; the first layer skips its input gradient (nobody needs it)."""
        backward_chain(self.layers, dlogits, need_dx=False)

    def train_step(self, xb, yb, optimizer):
        """One step on a prepared batch; returns (mean loss, logits)."""
        logits = self.forward(xb)
        loss = self.loss.forward(logits, yb)
        self.backward(self.loss.backward())
        if self.gradient_hook is not None:
            self.gradient_hook(self)
        optimizer.step(self)
        return loss, logits

    # -- data ---------------------------------------------------------------------------------

    def check_images(self, x, what="x"):
        """The one rule for images everywhere (fit, evaluate, predict): uint8 pixels are scaled
        by 1/255, float images are used as given and must be finite; anything else is refused."""
        self._check_input(x)
        if x.dtype != np.uint8 and x.dtype.kind != "f":
            raise TypeError(
                f"{what}: images must be uint8 (0..255, scaled to [0, 1] for you) or float "
                f"(used as given), got {x.dtype}: convert them first, e.g. "
                f"x.astype(np.uint8) for 0..255 pixels or x.astype(np.float32) / 255")
        if x.dtype.kind == "f":
            bad = _nonfinite_images(x)
            if len(bad):
                shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
                raise ValueError(f"{what}: {len(bad)} of {len(x)} images hold NaN or infinite "
                                 f"values (at index {shown}); fix or drop them")

    def prepare_batch(self, x, idx, out=None):
        """x[idx] in the network's dtype, uint8 images scaled to [0, 1]: what ``train_step``
        and ``forward`` take. ``out``: a buffer of at least len(idx) images to fill (the loop
        reuses one), else a new array."""
        if out is None:
            out = np.empty((len(idx),) + x.shape[1:], self.dtype)
        out = out[: len(idx)]
        if x.dtype == np.uint8:
            np.multiply(x[idx], out.dtype.type(1 / 255), out=out)
        else:
            np.copyto(out, x[idx], casting="same_kind")
        if self.normalization is not None:
            mean, std = self.normalization
            out -= mean.astype(out.dtype)[:, None, None]
            out /= std.astype(out.dtype)[:, None, None]
        return out

    def set_normalization(self, mean=None, std=None, x=None):
        """Normalise every image per channel, ``(image - mean[c]) / std[c]``, wherever images
        are prepared (fit, evaluate, predict, and after loading the model file, which keeps
        them). Either give ``mean`` and ``std`` (C values each, std > 0), or ``x``, images
        as fit takes them (uint8 scaled by 1/255), to compute them from; ``None`` for both and
        ``x`` turns it off. Returns self."""
        if x is not None:
            if mean is not None or std is not None:
                raise ValueError("give mean and std, or x to compute them from, not both")
            self.check_images(x, "x")
            mean, std = _channel_statistics(x)
        elif mean is None and std is None:
            self.normalization = None
            return self
        mean, std = (np.asarray(v, np.float64).reshape(-1) for v in (mean, std))
        channels = (self.input_shape or (len(mean),))[0]
        if mean.shape != (channels,) or std.shape != (channels,):
            raise ValueError(f"mean and std need {channels} values (one per channel), got "
                             f"{mean.size} and {std.size}")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"mean must be finite and std finite and > 0, got mean "
                             f"{mean.tolist()}, std {std.tolist()}")
        self.normalization = (mean, std)
        return self

    def check_data(self, x, y, what="x, y"):
        """Images as ``check_images`` wants them and 1-D integer labels in [0, K), as many as
        images; anything else is a TypeError or ValueError saying what (``what`` names the
        pair in the message)."""
        self.check_images(x, what)
        if not isinstance(y, np.ndarray) or y.ndim != 1 or y.dtype.kind not in "iu":
            got = (f"{y.dtype} {y.shape}" if isinstance(y, np.ndarray)
                   else type(y).__name__)
            hint = ""
            if isinstance(y, (list, tuple)):
                hint = ": convert them with np.asarray(y)"
            elif isinstance(y, np.ndarray) and y.ndim == 2 and len(y) == len(x):
                hint = ": one-hot rows? take y.argmax(1)"
            elif isinstance(y, np.ndarray) and y.ndim == 1 and y.dtype.kind in "fb":
                hint = ": whole-number labels stored as another type? y.astype(int)"
            raise TypeError(f"labels must be a 1-D integer numpy array ({what}), got {got}"
                            f"{hint}")
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels ({what})")
        if len(x) == 0:
            raise ValueError(f"no images ({what})")
        k = self.num_classes()
        if y.min() < 0 or y.max() >= k:
            raise ValueError(f"labels must lie in [0, {k}), got {y.min()}..{y.max()} ({what})")

    def _batches(self, x, batch_size, order=None):
        n = len(x)
        order = np.arange(n) if order is None else order
        buf = np.empty((min(batch_size, n),) + x.shape[1:], self.dtype)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield idx, self.prepare_batch(x, idx, buf)

    # -- training and evaluation --------------------------------------------------------------

    def fit(self, x, y, epochs=1, batch_size=10, lr=None, validation_data=None, shuffle=True,
            seed=None, verbose=None, optimizer=None, schedule=None, checkpoint=None,
            resume=None, early_stopping=None, run_info=None, distributed=None, augment=None):
        """Train in training mode; returns the per-epoch history (lists keyed by metric).

        x: (N, C, H, W) uint8 (scaled by 1/255 per batch) or float images; y: (N,) int labels.
        optimizer: a ``fastcnn.optim`` optimizer (default: the seed's plain SGD with ``lr``,
        0.05 unless given); its state carries over between calls. schedule: a
        ``fastcnn.optim`` schedule of the optimizer's learning rate, counted from this call's
        start. Validation runs in inference mode; the network is left in inference mode.
        verbose: a tqdm progress bar per epoch and one line per epoch on stdout; by default
        (None) on when stderr is a terminal or in a Jupyter kernel, off otherwise.

        checkpoint: a path written atomically after every epoch (and, on Ctrl-C, at the next
        batch boundary) with the model, optimizer state, schedule position, epoch, random
        states and history. resume: a checkpoint to continue from, with the same data and
        network: the run ends with exactly the weights of one left alone (``epochs`` is the
        total). early_stopping: a patience in epochs: stop when the validation loss has not
        improved for that many, and keep the best weights (needs validation_data). run_info:
        a JSON-able dict stored in the checkpoint as it is (the CLI keeps its settings there).
        augment: "crop" (moves of up to 4 pixels each way, "crop=N" for N), "flip" (mirror
        left-right), "crop,flip", or a ``fastcnn.augment.Augment``: drawn anew for every
        batch, seeded by ``seed`` (the same run gives the same weights; a checkpoint keeps the
        key, so resuming continues exactly).
        distributed: True (or a ``fastcnn.distributed.DataParallel``) when this is one of K
        processes under ``mpirun``: each takes its shard of every global batch of K x batch_size
        images and the gradients are averaged before every step (see fastcnn.distributed);
        rank 0 alone prints and writes the checkpoint.

        Batches hold ``batch_size`` images, the last one of an epoch the rest; where that rest
        is too small for the model (BatchNorm of one value per channel needs two images) it is
        trained with the batch before it, and the epoch has one batch fewer (verbose says so).

        Everything is checked before the first batch: images holding NaN or inf are a ValueError
        naming their indices. Training that goes wrong stops with ``TrainingDiverged`` (a
        FloatingPointError): a NaN or infinite loss, a smoothed loss grown past
        ``DIVERGENCE_FACTOR`` times where it started, parameters no longer finite after an
        epoch, or a first-batch loss that far above chance level before any update (then the
        message blames the images or the initial weights, not the learning rate).
        """
        return fit_network(self, x, y, epochs=epochs, batch_size=batch_size, lr=lr,
                           validation_data=validation_data, shuffle=shuffle, seed=seed,
                           verbose=verbose, optimizer=optimizer, schedule=schedule,
                           checkpoint=checkpoint, resume=resume, early_stopping=early_stopping,
                           run_info=run_info, distributed=distributed, augment=augment)

    def predict_proba(self, x, batch_size=64):
        """Class probabilities (N, K) for images x: uint8 (scaled by 1/255) or finite floats."""
        batch_size = _contract.check_int("batch_size", batch_size, 1)
        self.check_images(x)
        self.check_parameters()
        k = self.num_classes()
        out = [np.empty((0, k), self.dtype)]
        with self.mode(False):
            for idx, xb in self._batches(x, batch_size):
                logits = self._finite_logits(xb, idx)
                e = np.exp(logits - logits.max(axis=1, keepdims=True))
                out.append(e / e.sum(axis=1, keepdims=True))
        return np.concatenate(out)

    def predict(self, x, batch_size=64):
        """Predicted class (N,) int64 for images x."""
        return self.predict_proba(x, batch_size).argmax(axis=1)

    def evaluate(self, x, y, batch_size=64):
        """{"loss": mean cross-entropy, "accuracy": fraction correct} on images x, labels y."""
        batch_size = _contract.check_int("batch_size", batch_size, 1)
        self.check_data(x, y)
        self.check_parameters()
        total_loss = correct = 0.0
        with self.mode(False):
            for idx, xb in self._batches(x, batch_size):
                logits = self._finite_logits(xb, idx)
                total_loss += self.loss.forward(logits, y[idx]) * len(idx)
                correct += np.count_nonzero(logits.argmax(axis=1) == y[idx])
        return {"loss": float(total_loss / len(x)), "accuracy": float(correct / len(x))}

    def _finite_logits(self, xb, idx):
        """The forward pass at inference; outputs that are not finite are an error, never a
        prediction (the argmax of a NaN row would be class 0)."""
        logits = self.forward(xb)
        rows = ~np.isfinite(logits).all(axis=1)
        if rows.any():
            first = int(idx[np.argmax(rows)])
            raise FloatingPointError(
                f"the model's outputs are not finite for {int(rows.sum())} images of a batch "
                f"(the first at index {first}): its weights overflow on these images"
                f"{pixel_note(xb)}")
        return logits

    def nonfinite_parameter(self):
        """'layer i (Type) key' for the first parameter or buffer holding NaN or inf, else
        None."""
        for i, layer in enumerate(self.layers):
            for key, p in (*layer.params.items(), *layer.buffers.items()):
                if not np.isfinite(p).all():
                    return f"layer {i} ({type(layer).__name__}) {key}"
        return None

    def check_parameters(self):
        """A ValueError naming the first parameter or buffer that holds NaN or inf."""
        bad = self.nonfinite_parameter()
        if bad:
            raise ValueError(f"the model's {bad} holds NaN or infinite values")

    # -- persistence --------------------------------------------------------------------------

    def save(self, path):
        """Write the architecture (JSON) and parameters to one .npz file, atomically."""
        serialize.save(self, path)

    @classmethod
    def load(cls, path):
        """Read a model written by ``save``; a corrupt or foreign file is a ValueError."""
        return serialize.load(cls, path)

    def to_onnx(self, path, softmax=False):
        """Write the model to ``path`` as ONNX (opset 17), for onnxruntime and every other ONNX
        runtime: input ``images`` (N, C, H, W) float32 prepared as ``prepare_batch`` prepares
        them, output ``scores`` (N, K), and with ``softmax`` also ``probabilities`` (N, K);
        the preprocessing and class names in its metadata (``fastcnn.onnx_export``). Needs
        ``pip install 'fastcnn[onnx]'``."""
        from . import onnx_export

        onnx_export.export(self, path, softmax=softmax)

    @classmethod
    def from_onnx(cls, path):
        """Read an ONNX model fastcnn can represent (its own exports; the same layers written
        by other exporters, such as PyTorch's), in inference mode; any other graph, and any
        file that is not a sound ONNX model, is a ValueError naming the node or the problem
        (``fastcnn.onnx_import``)."""
        from . import onnx_import

        return onnx_import.load(cls, path)


def _nonfinite_images(x, chunk=4096):
    """Indices of the images in float array x that hold a NaN or an infinity (read in chunks:
    no mask as large as x)."""
    bad = []
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].reshape(min(chunk, len(x) - start), -1)
        rows = ~np.isfinite(part).all(axis=1)
        bad.extend((np.flatnonzero(rows) + start).tolist())
    return bad




def _channel_statistics(x, chunk=4096):
    """(mean, std) per channel of images x (uint8 scaled by 1/255), in float64, a chunk of
    images at a time; a channel that never varies gets std 1 (nothing to scale)."""
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    scale = 1 / 255 if x.dtype == np.uint8 else 1.0
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].astype(np.float64) * scale
        total += part.sum(axis=(0, 2, 3))
        squares += (part * part).sum(axis=(0, 2, 3))
    count = len(x) * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0))
    return mean, np.where(std > 1e-12, std, 1.0)
