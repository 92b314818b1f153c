"""The seed's two architectures, for 1x28x28 images and 10 classes."""

from __future__ import annotations

import numpy as np

from .layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from .network import ConvNet

MODELS = ("simple", "complex")


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


def build(name, dtype=np.float32, seed=0):
    """``"simple"`` or ``"complex"`` -> a fresh ConvNet."""
    if name == "simple":
        return simple_cnn(dtype, seed)
    if name == "complex":
        return complex_cnn(dtype, seed)
    raise ValueError(f"Unknown model {name!r}. Expected one of {MODELS}.")
