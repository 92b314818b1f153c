"""Training-step benchmarks: forward, backward and the SGD update of a whole model.

    pytest bench --benchmark-only -k steps

Groups are (model, batch); rows are backends. `naive` runs only the simple model at batch 10
(about a second a step; the complex model takes minutes a step there).
"""

import numpy as np
import pytest
from conftest import record_rate

import fastcnn
from fastcnn.models import build


def cases():
    out = []
    for model in ("simple", "complex"):
        for batch in (10, 64):
            for name in ("naive", "numpy", "numba"):
                if name == "naive" and (model, batch) != ("simple", 10):
                    continue
                marks = [pytest.mark.naive] if name == "naive" else []
                out.append(pytest.param(model, batch, name, marks=marks,
                                        id=f"{model}-b{batch}-{name}"))
    return out


@pytest.mark.parametrize("model,batch,name", cases())
def test_train_step(benchmark, rng, model, batch, name):
    x = rng.random((batch, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    with fastcnn.use_backend(name):
        net = build(model, seed=0)
        opt = fastcnn.SGD(0.01)
        net.train_step(x, y, opt)  # warm up: compile (numba) outside the timing
        benchmark.group = f"train step {model} batch {batch}"
        loss, logits = benchmark(net.train_step, x, y, opt)
    assert np.isfinite(loss) and logits.shape == (batch, 10)
    record_rate(benchmark, images=batch)
