"""The built-in models for 1x28x28 images and 10 classes (the seed's simple and complex CNNs, and
the modern one with BatchNorm and Dropout) and the training recipes that go with them."""

from __future__ import annotations

import numpy as np

from .layers import BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from .network import ConvNet


def simple_cnn(dtype=np.float32, seed=0):
    """Conv(1->8, 3x3, same) -> ReLU -> MaxPool 2 -> Flatten -> Dense(8*14*14 -> 10)."""
    rng = np.random.default_rng(seed)
    return ConvNet([
        Conv2D(1, 8, 3, padding="same", dtype=dtype, rng=rng),
        ReLU(),
        MaxPool2D(2),
        Flatten(),
        Dense(8 * 14 * 14, 10, dtype=dtype, rng=rng),
    ], input_shape=(1, 28, 28))


def complex_cnn(dtype=np.float32, seed=0):
    """Two conv blocks (32, 32 | 64, 64 channels, 3x3 same, each block ending in MaxPool 2), then
    Dense(64*7*7 -> 128) -> ReLU -> Dense(128 -> 10)."""
    rng = np.random.default_rng(seed)
    return ConvNet([
        Conv2D(1, 32, 3, dtype=dtype, rng=rng), ReLU(),
        Conv2D(32, 32, 3, dtype=dtype, rng=rng), ReLU(),
        MaxPool2D(2),
        Conv2D(32, 64, 3, dtype=dtype, rng=rng), ReLU(),
        Conv2D(64, 64, 3, dtype=dtype, rng=rng), ReLU(),
        MaxPool2D(2),
        Flatten(),
        Dense(64 * 7 * 7, 128, dtype=dtype, rng=rng), ReLU(),
        Dense(128, 10, dtype=dtype, rng=rng),
    ], input_shape=(1, 28, 28))


def modern_cnn(dtype=np.float32, seed=0):
    """The complex model with BatchNorm after every convolution (Conv -> BatchNorm -> ReLU) and
    Dropout(0.3) before the last layer: the architecture of the modern recipe (see RECIPES)."""
    rng = np.random.default_rng(seed)

    def block(c_in, c_out):
        return [Conv2D(c_in, c_out, 3, dtype=dtype, rng=rng), BatchNorm2D(c_out, dtype=dtype),
                ReLU()]

    return ConvNet([
        *block(1, 32), *block(32, 32), MaxPool2D(2),
        *block(32, 64), *block(64, 64), MaxPool2D(2),
        Flatten(),
        Dense(64 * 7 * 7, 128, dtype=dtype, rng=rng), ReLU(),
        Dropout(0.3, rng=rng),
        Dense(128, 10, dtype=dtype, rng=rng),
    ], input_shape=(1, 28, 28))


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
}


BUILDERS = {"simple": simple_cnn, "complex": complex_cnn, "modern": modern_cnn}
MODELS = tuple(BUILDERS)


def build(name, dtype=np.float32, seed=0):
    """A fresh ConvNet of a model named in ``MODELS`` ("simple", "complex", "modern")."""
    if name not in BUILDERS:
        raise ValueError(f"Unknown model {name!r}. Expected one of {MODELS}.")
    return BUILDERS[name](dtype, seed)
