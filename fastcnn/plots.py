"""Pictures of what training did (needs matplotlib: ``pip install -e ".[plot]"``).

Each function returns a matplotlib ``Figure`` (shown inline in a notebook) and, given ``path``,
also writes it as a PNG:

- ``learning_curves(history)``: loss and accuracy per epoch, training against validation, with
  the per-batch training loss smoothed behind them;
- ``confusion_matrix(net, x, y)``: how often each true class was predicted as each class;
- ``conv_filters(net)``: the first convolution layer's filters;
- ``feature_maps(net, image)``: one image through every convolution (after its ReLU);
- ``misclassified(net, x, y)``: test images the model gets wrong, true and predicted labels.

``save_all`` writes them all into a folder; ``fastcnn plot`` and ``fastcnn train --plot DIR``
call it. Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state), so nothing
opens a window and nothing leaks between calls.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import atomic

DPI = 100


def _figure(width, height):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError('the plots need matplotlib: pip install -e ".[plot]" (or pip install '
                          'matplotlib)') from e
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def check_available():
    """ImportError now, with the install command, if matplotlib is missing."""
    _figure(1, 1)


def _finish(fig, path):
    if path is not None:
        def write(f):
            fig.savefig(f, format="png", dpi=DPI)
        atomic.atomic_write(path, write)
    return fig


def _names(class_names, k):
    if class_names is None:
        return [str(i) for i in range(k)]
    names = list(class_names)
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} names, the model has {k} classes")
    return names


def _smooth(values, span):
    """Exponential moving average (weight 1/span), bias-corrected at the start."""
    out, avg, weight = [], 0.0, 0.0
    a = 1.0 / max(span, 1)
    for v in values:
        avg = (1 - a) * avg + a * v
        weight = (1 - a) * weight + a
        out.append(avg / weight)
    return out


def learning_curves(history, path=None, title=None):
    """Loss (left) and accuracy (right) per epoch, training and validation; behind the training
    loss, the per-batch loss smoothed over about a tenth of an epoch."""
    epochs = len(history.get("loss", []))
    if epochs == 0:
        raise ValueError("the history has no epochs to plot")
    fig = _figure(10, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    x = np.arange(1, epochs + 1)
    batches = [v for v in history.get("batch_loss", []) if v is not None]
    epoch_values = [v for v in [*history["loss"], *history.get("val_loss", [])] if v is not None]
    top = max(epoch_values)
    if batches:
        per_epoch = len(batches) / epochs
        bx = np.arange(1, len(batches) + 1) / per_epoch  # in epochs, at each batch's end
        smooth = _smooth(batches, per_epoch / 10)
        ax_loss.plot(bx, smooth, color="tab:blue", alpha=0.35,
                     linewidth=1, label="training, per batch (smoothed)")
        # the first batches' loss (chance level and above) would flatten the epochs' curves
        top = max(top, max(smooth[len(smooth) // 10:], default=top))
    ax_loss.set_ylim(0, top * 1.3)
    ax_loss.plot(x, history["loss"], "o-", color="tab:blue", label="training (epoch mean)")
    if history.get("val_loss"):
        ax_loss.plot(x[: len(history["val_loss"])], history["val_loss"], "s-",
                     color="tab:orange", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.plot(x, np.asarray(history["accuracy"]) * 100, "o-", color="tab:blue",
                label="training")
    if history.get("val_accuracy"):
        ax_acc.plot(x[: len(history["val_accuracy"])],
                    np.asarray(history["val_accuracy"]) * 100, "s-", color="tab:orange",
                    label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
        ax.set_xlim(0, epochs + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def _predict(net, x, batch_size=256):
    proba = net.predict_proba(x, batch_size=batch_size)
    return proba.argmax(axis=1), proba


def confusion_counts(y_true, y_pred, k):
    """(k, k) counts: row = true class, column = predicted class."""
    counts = np.zeros((k, k), np.int64)
    np.add.at(counts, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return counts


def confusion_matrix(net, x, y, class_names=None, path=None):
    """Counts of (true class, predicted class) on images x with labels y, each cell labelled,
    the diagonal (correct) in the colour scale's strongest end."""
    pred, _ = _predict(net, x)
    k = int(net.num_classes())
    names = _names(class_names, k)
    counts = confusion_counts(y, pred, k)
    fig = _figure(7.5, 6.5)
    ax = fig.subplots()
    # colour by the share of each true class, so rare and common classes read alike
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), names, rotation=45 if max(map(len, names)) > 2 else 0,
                  ha="right" if max(map(len, names)) > 2 else "center")
    ax.set_yticks(range(k), names)
    ax.set(xlabel="predicted class", ylabel="true class")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"Confusion matrix: {counts.sum():,} images, {accuracy:.2%} correct")
    fig.colorbar(im, ax=ax, label="share of the true class", shrink=0.8)
    return _finish(fig, path)


def _show_image(ax, image, cmap="gray"):
    """An image (C, H, W) or (H, W), uint8 or float: colour for 3 channels (floats clipped to
    [0, 1]), else its first channel in ``cmap``."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3:
        rgb = np.transpose(image, (1, 2, 0))
        rgb = rgb / 255.0 if rgb.dtype == np.uint8 else np.clip(rgb, 0, 1)
        ax.imshow(rgb)
    else:
        ax.imshow(image.reshape(image.shape[-2:]) if image.ndim == 2 else image[0], cmap=cmap)


def _holds_conv(layer):
    from .layers import Conv2D

    return isinstance(layer, Conv2D) or any(_holds_conv(c) for _, c in layer.children())


def _conv_layers(net):
    """(path, layer) of every Conv2D, those inside containers too, in the order they run."""
    from .layers import Conv2D

    convs = [(p, layer) for p, layer in net.walk() if isinstance(layer, Conv2D)]
    if not convs:
        raise ValueError("the model has no convolution layer")
    return convs


def feature_rows(net, x):
    """The feature maps that ``feature_maps`` draws, for a prepared batch ``x`` of one image:
    [(first, last, output (C, H, W))], one after each top-level layer ``first`` that is
    or holds a convolution (a residual block), taken after the BatchNorm and ReLU layers that
    follow it (``last`` is the index of the layer whose output it is)."""
    from .layers import ReLU, _BatchNorm

    _conv_layers(net)  # a model without convolutions is an error
    rows, layers, i = [], net.layers, 0
    with net.mode(False):
        while i < len(layers) and len(x.shape) == 4:
            x = layers[i].forward(x)
            if _holds_conv(layers[i]):
                first = i
                while i + 1 < len(layers) and isinstance(layers[i + 1], (ReLU, _BatchNorm)):
                    i += 1
                    x = layers[i].forward(x)
                rows.append((first, i, x[0]))
            i += 1
    return rows


def conv_filters(net, path=None):
    """The first convolution layer's filters, one small image per (filter, input channel) in a
    diverging colour scale centred on zero (red positive, blue negative); on colour input, one
    colour image per filter (grey is zero, each channel's weight moves its colour)."""
    _, conv = _conv_layers(net)[0]
    w = conv.params["weight"]  # (F, C, KH, KW)
    f, c = w.shape[:2]
    per_filter = c if c <= 4 and c != 3 else 1  # many input channels: their mean
    cols = min(8, f) * per_filter
    rows = math.ceil(f / min(8, f))
    fig = _figure(1.1 * cols + 1, 1.2 * rows + 0.6)
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    limit = float(np.abs(w).max()) or 1.0
    for ax in axes.ravel():
        ax.set_axis_off()
    for n in range(f):
        for ch in range(per_filter):
            ax = axes[n // 8, (n % 8) * per_filter + ch]
            if c == 3:  # as colour: -limit..limit -> 0..1 per channel
                ax.imshow(np.transpose(w[n], (1, 2, 0)) / (2 * limit) + 0.5)
            else:
                image = w[n, ch] if per_filter == c else w[n].mean(axis=0)
                ax.imshow(image, cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(f"{n}" if per_filter == 1 else f"{n}.{ch}", fontsize=8)
    fig.suptitle(f"First convolution's {f} filters ({w.shape[2]}x{w.shape[3]}, "
                 f"{c} input channel{'s' if c > 1 else ''}); red > 0 > blue")
    return _finish(fig, path)


def feature_maps(net, image, path=None, per_layer=8, label=None):
    """One image (C, H, W) or (H, W), uint8 or float, through the network: the input, then the
    first ``per_layer`` channels after each convolution (or residual block) and the BatchNorm
    and ReLU after it, one row each (``feature_rows``)."""
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[None]
    x = x[None]
    net.check_images(x)
    x = net.prepare_batch(x, [0])  # scaled and normalised as the model was trained
    outputs = feature_rows(net, x)
    rows = 1 + len(outputs)
    fig = _figure(1.3 * per_layer + 1.5, 1.45 * rows + 0.5)
    axes = fig.subplots(rows, per_layer, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    _show_image(axes[0, 0], image)
    axes[0, 0].set_title("input" + (f" ({label})" if label is not None else ""), fontsize=9)
    for r, (first, last, maps) in enumerate(outputs, start=1):
        for ch in range(min(per_layer, maps.shape[0])):
            ax = axes[r, ch]
            ax.imshow(maps[ch], cmap="viridis")
            ax.set_title(f"row {r}, ch {ch}" if ch == 0 else f"ch {ch}", fontsize=8)
        where = f"layer {first}" if first == last else f"layers {first}-{last}"
        axes[r, 0].text(-0.15, 0.5, f"{where}\n{type(net.layers[first]).__name__}\n"
                        f"{maps.shape[0]} maps\n"
                        f"{maps.shape[1]}x{maps.shape[2]}", transform=axes[r, 0].transAxes,
                        ha="right", va="center", fontsize=8)
    fig.suptitle("Feature maps after each convolution or residual block, its BatchNorm and "
                 "ReLU (bright = strong)")
    return _finish(fig, path)


def misclassified(net, x, y, class_names=None, path=None, count=24):
    """Up to ``count`` images the model gets wrong, the most confident mistakes first, each
    titled with its true and predicted class and the predicted probability."""
    pred, proba = _predict(net, x)
    names = _names(class_names, proba.shape[1])
    wrong = np.flatnonzero(pred != np.asarray(y))
    wrong = wrong[np.argsort(-proba[wrong, pred[wrong]], kind="stable")][:count]
    cols = 8
    rows = max(1, math.ceil(len(wrong) / cols))
    fig = _figure(1.45 * cols, 1.75 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, i in zip(axes.ravel(), wrong, strict=False):
        _show_image(ax, x[i], "gray_r")
        ax.set_title(f"true {_short(names[y[i]])}\nsaid {_short(names[pred[i]])} "
                     f"{proba[i, pred[i]]:.0%}", fontsize=8)
    fig.suptitle(f"{len(np.flatnonzero(pred != np.asarray(y))):,} of {len(y):,} test images "
                 f"misclassified; the {len(wrong)} most confident mistakes")
    return _finish(fig, path)


def _short(name, width=11):
    return name if len(name) <= width else name[: width - 1] + "."


FILES = ("learning_curves.png", "confusion_matrix.png", "filters.png", "feature_maps.png",
         "misclassified.png")


def save_all(net, x_test, y_test, out_dir, history=None, class_names=None, image_index=0):
    """Every picture into ``out_dir`` (created): the learning curves when a history is given,
    then the confusion matrix and misclassified images on (x_test, y_test), the filters, and the
    feature maps of test image ``image_index``. Returns the paths written."""
    check_available()
    if not 0 <= image_index < len(x_test):
        raise ValueError(f"image_index {image_index} is outside the {len(x_test)} test images")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if history is not None and history.get("loss"):
        written.append(out / FILES[0])
        learning_curves(history, written[-1])
    written.append(out / FILES[1])
    confusion_matrix(net, x_test, y_test, class_names, written[-1])
    written.append(out / FILES[2])
    conv_filters(net, written[-1])
    names = _names(class_names, int(net.num_classes()))
    written.append(out / FILES[3])
    feature_maps(net, x_test[image_index], written[-1],
                 label=names[int(y_test[image_index])])
    written.append(out / FILES[4])
    misclassified(net, x_test, y_test, class_names, written[-1])
    return written
