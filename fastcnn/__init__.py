"""fastcnn: a convolutional neural network library from scratch, on interchangeable kernel
backends (Python loops, vectorized NumPy, Numba).

The names below are imported on first use (PEP 562), so ``import fastcnn`` and the ``fastcnn``
command start without loading NumPy first; ``fastcnn.models``, ``fastcnn.datasets`` and the other
submodules are reachable as attributes too.
"""

import importlib

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "available_backends": "backend", "get_backend": "backend", "set_backend": "backend",
    "use_backend": "backend",
    "Conv2D": "layers", "Dense": "layers", "Flatten": "layers", "MaxPool2D": "layers",
    "ReLU": "layers", "SoftmaxCrossEntropy": "layers", "Dropout": "layers",
    "BatchNorm2D": "layers", "BatchNorm1D": "layers", "AvgPool2D": "layers",
    "GlobalAvgPool2D": "layers",
    "ConvNet": "network", "TrainingDiverged": "training",
    "SGD": "optim", "Adam": "optim", "AdamW": "optim",
    "get_num_threads": "threads", "set_num_threads": "threads",
}
_SUBMODULES = ("atomic", "backend", "benchmark", "datasets", "history", "idx", "jit_cost",
               "kernels", "layers", "memory", "models", "network", "onnx_export", "onnx_import",
               "optim", "plots", "predict", "serialize", "spawn", "threads")

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastcnn' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
