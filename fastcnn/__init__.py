"""fastcnn: a convolutional neural network library from scratch, on interchangeable kernel
backends (Python loops, vectorized NumPy, Numba)."""

from .backend import available_backends, get_backend, set_backend, use_backend
from .layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, SoftmaxCrossEntropy
from .network import SGD, ConvNet
from .threads import get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "SGD", "Conv2D", "ConvNet", "Dense", "Flatten", "MaxPool2D", "ReLU", "SoftmaxCrossEntropy",
    "available_backends", "get_backend", "get_num_threads", "set_backend", "set_num_threads",
    "use_backend", "__version__",
]
