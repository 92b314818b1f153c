"""The built-in models (the seed's simple and complex CNNs, the modern one with BatchNorm and
Dropout, and a small ResNet) and the training recipes that go with them. Each builder takes
the images' shape (C, H, W; default 1x28x28 digits) and the number of classes."""

from __future__ import annotations

import numpy as np

from .layers import (
    BatchNorm2D,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool2D,
    MaxPool2D,
    ReLU,
    Residual,
    Sequential,
)
from .network import ConvNet

DIGITS = (1, 28, 28)


def _shape(input_shape, pools):
    """(C, H, W) as ints, each side at least 2**pools (the model halves it that often)."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    c, h, w = (int(s) for s in input_shape)
    if c < 1 or min(h, w) < 2 ** pools:
        raise ValueError(f"input_shape {tuple(input_shape)}: this model halves the image "
                         f"{pools} times, so each side needs at least {2 ** pools} pixels")
    return c, h, w


def simple_cnn(dtype=np.float32, seed=0, input_shape=DIGITS, classes=10):
    """Conv(C->8, 3x3, same) -> ReLU -> MaxPool 2 -> Flatten -> Dense(8*H/2*W/2 -> classes)."""
    c, h, w = _shape(input_shape, 1)
    rng = np.random.default_rng(seed)
    return ConvNet([
        Conv2D(c, 8, 3, padding="same", dtype=dtype, rng=rng),
        ReLU(),
        MaxPool2D(2),
        Flatten(),
        Dense(8 * (h // 2) * (w // 2), classes, dtype=dtype, rng=rng),
    ], input_shape=(c, h, w))


def complex_cnn(dtype=np.float32, seed=0, input_shape=DIGITS, classes=10):
    """Two conv blocks (32, 32 | 64, 64 channels, 3x3 same, each block ending in MaxPool 2), then
    Dense(64*H/4*W/4 -> 128) -> ReLU -> Dense(128 -> classes)."""
    c, h, w = _shape(input_shape, 2)
    rng = np.random.default_rng(seed)
    return ConvNet([
        Conv2D(c, 32, 3, dtype=dtype, rng=rng), ReLU(),
        Conv2D(32, 32, 3, dtype=dtype, rng=rng), ReLU(),
        MaxPool2D(2),
        Conv2D(32, 64, 3, dtype=dtype, rng=rng), ReLU(),
        Conv2D(64, 64, 3, dtype=dtype, rng=rng), ReLU(),
        MaxPool2D(2),
        Flatten(),
        Dense(64 * (h // 4) * (w // 4), 128, dtype=dtype, rng=rng), ReLU(),
        Dense(128, classes, dtype=dtype, rng=rng),
    ], input_shape=(c, h, w))


def modern_cnn(dtype=np.float32, seed=0, input_shape=DIGITS, classes=10):
    """The complex model with BatchNorm after every convolution (Conv -> BatchNorm -> ReLU) and
    Dropout(0.3) before the last layer: the architecture of the modern recipe (see RECIPES)."""
    c, h, w = _shape(input_shape, 2)
    rng = np.random.default_rng(seed)

    def block(c_in, c_out):
        return [Conv2D(c_in, c_out, 3, dtype=dtype, rng=rng), BatchNorm2D(c_out, dtype=dtype),
                ReLU()]

    return ConvNet([
        *block(c, 32), *block(32, 32), MaxPool2D(2),
        *block(32, 64), *block(64, 64), MaxPool2D(2),
        Flatten(),
        Dense(64 * (h // 4) * (w // 4), 128, dtype=dtype, rng=rng), ReLU(),
        Dropout(0.3, rng=rng),
        Dense(128, classes, dtype=dtype, rng=rng),
    ], input_shape=(c, h, w))


def residual_block(c_in, c_out, stride, dtype=np.float32, rng=None):
    """A ResNet basic block: Conv 3x3 (stride) -> BatchNorm -> ReLU -> Conv 3x3 -> BatchNorm,
    plus the input (the identity, or a strided 1x1 Conv -> BatchNorm where the shape changes),
    then ReLU. Returns the two layers: the Residual and the ReLU after the add."""
    main = Sequential([
        Conv2D(c_in, c_out, 3, stride=stride, padding=1, dtype=dtype, rng=rng),
        BatchNorm2D(c_out, dtype=dtype), ReLU(),
        Conv2D(c_out, c_out, 3, padding=1, dtype=dtype, rng=rng),
        BatchNorm2D(c_out, dtype=dtype)])
    shortcut = None
    if stride != 1 or c_in != c_out:
        shortcut = Sequential([Conv2D(c_in, c_out, 1, stride=stride, padding=0, dtype=dtype,
                                      rng=rng), BatchNorm2D(c_out, dtype=dtype)])
    return [Residual(main, shortcut), ReLU()]


def resnet(dtype=np.float32, seed=0, input_shape=DIGITS, classes=10, widths=(16, 32, 64),
           blocks=2):
    """A small ResNet (He et al. 2016, the CIFAR variant): a 3x3 stem of widths[0] channels
    with BatchNorm and ReLU, then one stage per width of ``blocks`` residual blocks (each
    stage after the first halves the image with a stride-2 block and a 1x1 projection),
    global average pooling and one Dense layer. 16/32/64 channels, 2 blocks a stage: 175k
    parameters, 40 MFLOP per 28x28 image."""
    c, h, w = _shape(input_shape, len(widths) - 1)
    rng = np.random.default_rng(seed)
    layers = [Conv2D(c, widths[0], 3, dtype=dtype, rng=rng), BatchNorm2D(widths[0], dtype=dtype),
              ReLU()]
    width = widths[0]
    for stage, out in enumerate(widths):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            layers += residual_block(width, out, stride, dtype, rng)
            width = out
    layers += [GlobalAvgPool2D(), Dense(width, classes, dtype=dtype, rng=rng)]
    return ConvNet(layers, input_shape=(c, h, w))


# Training recipes: the seed's (2015: plain SGD, batch 10) and a modern one (BatchNorm, AdamW,
# batch 64, a linear warm-up over the first 3% of the batches, then a cosine decay to 0 per
# batch). `fastcnn train --recipe NAME` uses these as defaults; every one can still be
# overridden by its own flag (--warmup in batches).
RECIPES = {
    "seed": {"model": "simple", "optimizer": "sgd", "lr": 0.05, "momentum": 0.0,
             "weight_decay": 0.0, "batch_size": 10, "epochs": 5, "schedule": "constant",
             "warmup_fraction": 0.0},
    "modern": {"model": "modern", "optimizer": "adamw", "lr": 2e-3, "momentum": 0.0,
               "weight_decay": 1e-4, "batch_size": 64, "epochs": 5, "schedule": "cosine",
               "warmup_fraction": 0.03},
    # the small ResNet: SGD with momentum 0.9, weight decay 5e-4, batch 128, a short warm-up
    # and a cosine decay, moves of up to 2 pixels and mirror images (the usual recipe for
    # CIFAR-size ResNets; without the augmentation it fitted Fashion-MNIST's training images to
    # 99.8% and its test images to 93.25%)
    "resnet": {"model": "resnet", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
               "weight_decay": 5e-4, "batch_size": 128, "epochs": 15, "schedule": "cosine",
               "warmup_fraction": 0.02, "normalize": True, "augment": "crop=2,flip"},
}


BUILDERS = {"simple": simple_cnn, "complex": complex_cnn, "modern": modern_cnn, "resnet": resnet}
MODELS = tuple(BUILDERS)


def build(name, dtype=np.float32, seed=0, input_shape=DIGITS, classes=10):
    """A fresh ConvNet of a model named in ``MODELS`` ("simple", "complex", "modern",
    "resnet") for images of ``input_shape`` (C, H, W) and ``classes`` classes."""
    if name not in BUILDERS:
        raise ValueError(f"Unknown model {name!r}. Expected one of {MODELS}.")
    return BUILDERS[name](dtype, seed, input_shape=input_shape, classes=classes)
