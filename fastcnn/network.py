"""ConvNet: a stack of layers, its training loop and its evaluation.

One training step is split into seams so later features slot in without touching the kernels:
forward -> loss -> backward -> gradient hook -> optimizer step (see ``train_step``).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from . import serialize
from .backend import kernels
from .layers import Layer, SoftmaxCrossEntropy


class SGD:
    """Plain mini-batch SGD on the gradient of the mean loss: ``p -= lr * grad``."""

    def __init__(self, lr):
        if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        self.lr = float(lr)

    def step(self, net):
        update = kernels().sgd_update
        for layer in net.layers:
            for key, p in layer.params.items():
                update(p, layer.grads[key], self.lr)


class ConvNet:
    """A feed-forward network of fastcnn layers, trained with softmax cross-entropy.

    ``input_shape`` is the per-sample shape (C, H, W). When given, every ``add`` checks that the
    new layer fits what comes before it; otherwise the check runs on the first batch.
    """

    def __init__(self, layers=None, input_shape=None):
        self.layers: list[Layer] = []
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
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

    @property
    def dtype(self):
        for layer in self.layers:
            for p in layer.params.values():
                return p.dtype
        return np.dtype(np.float32)

    def num_params(self):
        return sum(p.size for layer in self.layers for p in layer.params.values())

    def summary(self):
        """A table of layers, their output shapes and parameter counts, as a string."""
        shapes = self.output_shapes() if self.input_shape is not None else [None] * len(self.layers)
        rows = [("layer", "output shape", "params")]
        for layer, shape in zip(self.layers, shapes, strict=True):
            out = "?" if shape is None else "(N, " + ", ".join(map(str, shape)) + ")"
            rows.append((repr(layer), out, f"{sum(p.size for p in layer.params.values()):,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"total parameters: {self.num_params():,}")
        return "\n".join(lines)

    # -- forward and backward -----------------------------------------------------------------

    def _check_input(self, x):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"x must be a batch of images shaped (N, C, H, W), got {x.shape}")
        if self.input_shape is None:
            self.input_shape = tuple(x.shape[1:])
            self.output_shapes()
        elif x.shape[1:] != self.input_shape:
            raise ValueError(f"x has images of shape {x.shape[1:]}, the network expects "
                             f"{self.input_shape}")

    def forward(self, x):
        """Logits (N, K) for a batch already in the network's dtype."""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dlogits):
        """Fill every layer's grads; the first layer skips its input gradient (nobody needs it)."""
        dy = dlogits
        for i in range(len(self.layers) - 1, -1, -1):
            dy = self.layers[i].backward(dy, need_dx=i > 0)

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

    def _batch(self, x, idx, out):
        """x[idx] as the network's dtype; uint8 images are scaled to [0, 1]."""
        out = out[: len(idx)]
        if x.dtype == np.uint8:
            np.multiply(x[idx], out.dtype.type(1 / 255), out=out)
        else:
            np.copyto(out, x[idx], casting="same_kind")
        return out

    def _check_data(self, x, y, what="x, y"):
        self._check_input(x)
        if x.dtype != np.uint8 and x.dtype.kind != "f":
            raise TypeError(f"images must be uint8 or float, got {x.dtype}")
        if not isinstance(y, np.ndarray) or y.ndim != 1 or y.dtype.kind not in "iu":
            raise TypeError(f"labels must be a 1-D integer numpy array ({what})")
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels ({what})")
        if len(x) == 0:
            raise ValueError(f"no images ({what})")
        k = self.output_shapes()[-1][0]
        if y.min() < 0 or y.max() >= k:
            raise ValueError(f"labels must lie in [0, {k}), got {y.min()}..{y.max()} ({what})")

    def _batches(self, x, batch_size, order=None):
        n = len(x)
        order = np.arange(n) if order is None else order
        buf = np.empty((min(batch_size, n),) + x.shape[1:], self.dtype)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield idx, self._batch(x, idx, buf)

    # -- training and evaluation --------------------------------------------------------------

    def fit(self, x, y, epochs=1, batch_size=10, lr=0.05, validation_data=None, shuffle=True,
            seed=None, verbose=False):
        """Train with mini-batch SGD; returns the per-epoch history (lists keyed by metric).

        x: (N, C, H, W) uint8 (scaled by 1/255 per batch) or float images; y: (N,) int labels.
        verbose: a tqdm progress bar per epoch and one line per epoch on stdout.
        """
        self._check_data(x, y)
        if validation_data is not None:
            self._check_data(*validation_data, what="validation_data")
        epochs = int(epochs)
        batch_size = int(batch_size)
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
        optimizer = SGD(lr)
        rng = np.random.default_rng(seed)
        keys = ("loss", "accuracy", "val_loss", "val_accuracy", "seconds", "images_per_second")
        history = {k: [] for k in keys}
        for epoch in range(1, epochs + 1):
            order = rng.permutation(len(x)) if shuffle else None
            bar = _progress(len(x), f"epoch {epoch}/{epochs}", verbose)
            start = time.perf_counter()
            total_loss = correct = seen = 0
            for b, (idx, xb) in enumerate(self._batches(x, batch_size, order)):
                yb = y[idx]
                loss, logits = self.train_step(xb, yb, optimizer)
                if not np.isfinite(loss):
                    bar.close()
                    raise FloatingPointError(
                        f"training diverged: the loss became {loss} at epoch {epoch}, batch {b + 1}"
                        f" (lr={lr}); try a smaller learning rate")
                total_loss += loss * len(idx)
                correct += int(np.count_nonzero(logits.argmax(axis=1) == yb))
                seen += len(idx)
                bar.update(len(idx))
                if b % 20 == 0:
                    bar.set_postfix(loss=f"{total_loss / seen:.4f}", refresh=False)
            bar.close()
            seconds = time.perf_counter() - start
            history["loss"].append(total_loss / seen)
            history["accuracy"].append(correct / seen)
            history["seconds"].append(seconds)
            history["images_per_second"].append(seen / seconds)
            if validation_data is not None:
                val = self.evaluate(*validation_data)
                history["val_loss"].append(val["loss"])
                history["val_accuracy"].append(val["accuracy"])
            if verbose:
                line = (f"epoch {epoch}/{epochs}: loss {history['loss'][-1]:.4f}  "
                        f"train acc {history['accuracy'][-1]:.2%}")
                if validation_data is not None:
                    line += f"  val acc {history['val_accuracy'][-1]:.2%}"
                line += f"  {seconds:.1f} s ({seen / seconds:,.0f} img/s)"
                print(line, flush=True)
        return history

    def predict_proba(self, x, batch_size=64):
        """Class probabilities (N, K) for images x (uint8 or float)."""
        self._check_input(x)
        out = []
        for _, xb in self._batches(x, batch_size):
            logits = self.forward(xb)
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            out.append(e / e.sum(axis=1, keepdims=True))
        return np.concatenate(out)

    def predict(self, x, batch_size=64):
        """Predicted class (N,) int64 for images x."""
        return self.predict_proba(x, batch_size).argmax(axis=1)

    def evaluate(self, x, y, batch_size=64):
        """{"loss": mean cross-entropy, "accuracy": fraction correct} on images x, labels y."""
        self._check_data(x, y)
        total_loss = correct = 0.0
        for idx, xb in self._batches(x, batch_size):
            logits = self.forward(xb)
            total_loss += self.loss.forward(logits, y[idx]) * len(idx)
            correct += np.count_nonzero(logits.argmax(axis=1) == y[idx])
        return {"loss": float(total_loss / len(x)), "accuracy": float(correct / len(x))}

    # -- persistence --------------------------------------------------------------------------

    def save(self, path):
        """Write the architecture (JSON) and parameters to one .npz file, atomically."""
        serialize.save(self, path)

    @classmethod
    def load(cls, path):
        """Read a model written by ``save``; a corrupt or foreign file is a ValueError."""
        return serialize.load(cls, path)


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(total, desc, verbose):
    if not verbose:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.25)
