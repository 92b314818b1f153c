"""Per-kernel benchmarks on the layer shapes of the seed's two models, backends side by side.

    pytest bench --benchmark-only -k kernels

Each group is one kernel on one shape; its rows are the backends. `naive` runs only on the
"small" shape (batch 1, 4 channels, 12x12), the one shape all three backends share.
"""

import numpy as np
import pytest
from conftest import record_rate

from fastcnn import backend

# label: (N, C, H, W, F, K, pad) -- every layer runs 3x3 'same' convolutions at batch 10
CONV = {
    "small": (1, 4, 12, 12, 4, 3, 1),
    "simple.conv1": (10, 1, 28, 28, 8, 3, 1),
    "complex.conv1": (10, 1, 28, 28, 32, 3, 1),
    "complex.conv2": (10, 32, 28, 28, 32, 3, 1),
    "complex.conv3": (10, 32, 14, 14, 64, 3, 1),
    "complex.conv4": (10, 64, 14, 14, 64, 3, 1),
}
# label: (N, C, H, W), 2x2 pooling, stride 2
POOL = {
    "small": (1, 4, 12, 12),
    "simple.pool": (10, 8, 28, 28),
    "complex.pool1": (10, 32, 28, 28),
    "complex.pool2": (10, 64, 14, 14),
}
BACKENDS = ("naive", "numpy", "numba")


def cases(shapes):
    """(backend, label) pairs: every backend on "small", the fast ones on the real layers."""
    out = []
    for label in shapes:
        for name in BACKENDS:
            if name == "naive" and label != "small":
                continue
            marks = [pytest.mark.naive] if name == "naive" else []
            out.append(pytest.param(name, label, id=f"{label}-{name}", marks=marks))
    return out


@pytest.mark.parametrize("kernel", ["conv2d_forward", "conv2d_grad_weight", "conv2d_grad_input"])
@pytest.mark.parametrize("name,label", cases(CONV))
def test_conv(benchmark, rng, kernel, name, label):
    n, c, h, w, f, k, pad = CONV[label]
    ker = backend.load(name)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((f, c, k, k)).astype(np.float32)
    b = np.zeros(f, np.float32)
    dy = rng.standard_normal((n, f, h, w)).astype(np.float32)
    args = {
        "conv2d_forward": (x, wt, b, 1, pad),
        "conv2d_grad_weight": (x, dy, k, 1, pad),
        "conv2d_grad_input": (dy, wt, x.shape, 1, pad),
    }[kernel]
    benchmark.group = f"{kernel} {label} {(n, c, h, w)}->{f}"
    out = benchmark(getattr(ker, kernel), *args)
    first = out[0] if isinstance(out, tuple) else out
    assert np.all(np.isfinite(first))
    record_rate(benchmark, flop=2 * n * f * c * k * k * h * w)


@pytest.mark.parametrize("kernel", ["maxpool2d_forward", "maxpool2d_backward"])
@pytest.mark.parametrize("name,label", cases(POOL))
def test_pool(benchmark, rng, kernel, name, label):
    shape = POOL[label]
    ker = backend.load(name)
    x = rng.standard_normal(shape).astype(np.float32)
    benchmark.group = f"{kernel} {label} {shape}"
    if kernel == "maxpool2d_forward":
        y, _ = benchmark(ker.maxpool2d_forward, x, 2, 2)
    else:
        y, arg = ker.maxpool2d_forward(x, 2, 2)
        dx = benchmark(ker.maxpool2d_backward, y, arg, x.shape, 2, 2)
        assert dx.shape == x.shape
    assert y.shape == (*shape[:2], shape[2] // 2, shape[3] // 2)
    record_rate(benchmark)
