"""The configurations tests/test_distributed.py trains both ways: K processes with batch b under
mpirun (tests/mpi/train_ranks.py), and one process with batch K x b."""

import numpy as np

import fastcnn
from fastcnn import models

# n images: 3 global batches of 2 x 5 and one of a single image (rank 1 gets none: the empty
# shard's path); two epochs, so that momentum and Adam's moments carry across
CASES = {
    "sgd_momentum_float64": dict(model="simple", dtype="float64", optimizer="sgd", batch=5, n=31,
                                 epochs=2),
    "adam_float64": dict(model="complex", dtype="float64", optimizer="adam", batch=5, n=21,
                         epochs=2),
    "sgd_momentum_float32": dict(model="simple", dtype="float32", optimizer="sgd", batch=5, n=31,
                                 epochs=2),
    "adam_float32": dict(model="simple", dtype="float32", optimizer="adam", batch=5, n=31,
                         epochs=2),
    # a gradient hook of the caller's (here: halving every gradient) sees the averaged gradient
    "hooked_float64": dict(model="simple", dtype="float64", optimizer="sgd", batch=5, n=31,
                           epochs=1, hook=True),
    # BatchNorm (each rank's own shard statistics) and Dropout: not one process's run, but every
    # rank must still end with the same model
    "modern_float32": dict(model="modern", dtype="float32", optimizer="adam", batch=5, n=30,
                           epochs=2, compare=False),
    # a residual model's gradients (containers' parameters) are averaged like a stack's
    "residual_float64": dict(model="residual", dtype="float64", optimizer="sgd", batch=5, n=31,
                             epochs=2),
    # the ResNet augmented: each rank draws its own moves; every rank still ends the same
    "resnet_augmented_float32": dict(model="resnet", dtype="float32", optimizer="sgd", batch=5,
                                     n=30, epochs=1, augment="crop=2,flip", compare=False),
}


def residual(dtype):
    """A small residual model without BatchNorm (whose shard statistics would differ)."""
    from fastcnn import layers as L

    rng = np.random.default_rng(0)
    return fastcnn.ConvNet([
        L.Conv2D(1, 4, 3, dtype=dtype, rng=rng), L.ReLU(), L.MaxPool2D(2),
        L.Residual(L.Sequential([L.Conv2D(4, 4, 3, dtype=dtype, rng=rng), L.ReLU(),
                                 L.Conv2D(4, 4, 3, dtype=dtype, rng=rng)])), L.ReLU(),
        L.Residual(L.Conv2D(4, 6, 3, stride=2, dtype=dtype, rng=rng),
                   L.Conv2D(4, 6, 1, stride=2, padding=0, dtype=dtype, rng=rng)),
        L.AvgPool2D(2), L.GlobalAvgPool2D(), L.Dense(6, 10, dtype=dtype, rng=rng)],
        input_shape=(1, 28, 28))


def halve(net):
    for _, _, grad in net.parameters():
        grad *= 0.5


def make(case):
    if case["model"] == "residual":
        net = residual(np.dtype(case["dtype"]))
    else:
        net = models.build(case["model"], dtype=np.dtype(case["dtype"]), seed=0)
    if case.get("hook"):
        net.gradient_hook = halve
    if case["optimizer"] == "sgd":
        opt = fastcnn.SGD(0.05, momentum=0.9)
    else:
        opt = fastcnn.Adam(1e-3)
    return net, opt


def data(case):
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (case["n"], 1, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, case["n"])
    return x, y
