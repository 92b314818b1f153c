"""Inference benchmarks: fastcnn's forward pass against onnxruntime on the same exported model.

    pytest bench --benchmark-only -k onnx

Groups are (model, batch); rows are the two engines. `python bench/onnx_speed.py` measures the
same in turns, one round after another, and prints the ratio; the last test runs it at tiny
settings. Needs onnx and onnxruntime (the onnx extra); without them these skip, unless
FASTCNN_REQUIRE_ONNX=1 (CI sets it).
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import record_rate

import fastcnn
from fastcnn import models

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
if not HAVE_ONNX and os.environ.get("FASTCNN_REQUIRE_ONNX") == "1":
    raise RuntimeError("FASTCNN_REQUIRE_ONNX=1 but onnx or onnxruntime is missing: pip install "
                       "-e '.[onnx]'")
pytestmark = pytest.mark.skipif(not HAVE_ONNX, reason="onnx/onnxruntime not installed")


@pytest.mark.parametrize("engine", ["fastcnn", "onnxruntime"])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("model", ["complex", "resnet"])
def test_inference(benchmark, tmp_path, rng, model, batch, engine):
    import onnxruntime as ort

    x = rng.random((batch, 1, 28, 28), dtype=np.float32)
    with fastcnn.use_backend("numba"):
        net = models.build(model).eval()
        net.to_onnx(tmp_path / "m.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = fastcnn.get_num_threads(), 1
        session = ort.InferenceSession(str(tmp_path / "m.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        run = {"fastcnn": net.forward,
               "onnxruntime": lambda x: session.run(["scores"], {"images": x})[0]}[engine]
        expected = net.forward(x)  # also compiles, outside the timing
        benchmark.group = f"inference {model} batch {batch}"
        scores = benchmark(run, x)
    assert scores.shape == (batch, 10) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    record_rate(benchmark, images=batch)


def test_the_onnx_speed_script_prints_its_table():
    script = Path(__file__).resolve().parent / "onnx_speed.py"
    run = subprocess.run([sys.executable, str(script), "--models", "complex", "resnet",
                          "--batch", "1", "3", "--rounds", "1", "--seconds", "0.01",
                          "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^fastcnn .* against onnxruntime .* 1 threads each; .+, \d+ logical cores",
                     run.stdout, re.M), run.stdout
    rows = re.findall(r"^(complex|resnet) \| (1|3) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+)x$",
                      run.stdout, re.M)
    assert [(m, b) for m, b, *_ in rows] == [("complex", "1"), ("complex", "3"),
                                             ("resnet", "1"), ("resnet", "3")], run.stdout
    assert all(int(a.replace(",", "")) > 0 and int(b.replace(",", "")) > 0 and float(r) > 0
               for _, _, a, b, r in rows)
