"""Every backend agrees with ``naive``, the specification, and one trainer drives them all."""

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_BACKENDS

from fastcnn import Conv2D, ConvNet, Dense, Flatten, MaxPool2D, ReLU, backend, use_backend
from fastcnn.kernels import _contract

from reference import tol

NAIVE = backend.load("naive")
# Without the JIT (see the last tests) the kernels run as Python: a smaller grid keeps it quick.
NO_JIT = os.environ.get("NUMBA_DISABLE_JIT") == "1"


def conv_grid(count=5 if NO_JIT else 16, seed=1234):
    """Seeded random conv shapes: odd, non-square, kernels 1..5 and non-square ones, strides 1/2,
    pads from 0 to past the kernel, channel counts around the 4-channel blocks of numba."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        kh, kw = (int(k) for k in rng.choice([1, 2, 3, 5], 2)) if rng.random() < 0.3 else (
            (int(rng.choice([1, 3, 5])),) * 2)
        pad, stride = int(rng.integers(0, max(kh, kw) + 1)), int(rng.integers(1, 3))
        h, w = int(rng.integers(3, 10)), int(rng.integers(3, 10))
        if h + 2 * pad < kh or w + 2 * pad < kw:
            continue
        n, c, f = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.choice([1, 3, 4, 5, 8]))
        cases.append((n, c, h, w, f, kh, kw, stride, pad))
    return cases


def pool_grid(count=4 if NO_JIT else 10, seed=99):
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        size, stride = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        h, w = int(rng.integers(size, 10)), int(rng.integers(size, 10))
        cases.append((int(rng.integers(1, 3)), int(rng.integers(1, 4)), h, w, size, stride))
    return cases


@pytest.fixture(params=FAST_BACKENDS)
def fast(request):
    return backend.load(request.param)


def case_id(case):
    return "-".join(map(str, case))


@pytest.mark.parametrize("case", conv_grid(), ids=case_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_agrees_with_naive(fast, rng, case, dtype):
    n, c, h, w, f, kh, kw, stride, pad = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((f, c, kh, kw)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    y = fast.conv2d_forward(x, wt, b, stride, pad)
    np.testing.assert_allclose(y, NAIVE.conv2d_forward(x, wt, b, stride, pad), **tol(dtype))
    dy = rng.standard_normal(y.shape).astype(dtype)
    for got, want in zip(fast.conv2d_grad_weight(x, dy, (kh, kw), stride, pad),
                         NAIVE.conv2d_grad_weight(x, dy, (kh, kw), stride, pad), strict=True):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, **tol(dtype))
    dx = fast.conv2d_grad_input(dy, wt, x.shape, stride, pad)
    assert dx.shape == x.shape and dx.dtype == dtype
    np.testing.assert_allclose(dx, NAIVE.conv2d_grad_input(dy, wt, x.shape, stride, pad),
                               **tol(dtype))
    assert_fused_backward_is_the_same(fast, x, wt, b, dy, stride, pad)
    assert_relu_fusion_is_the_same(fast, x, wt, b, dy, stride, pad)


def assert_relu_fusion_is_the_same(fast, x, wt, b, dy, stride, pad):
    """The optional group "conv2d_relu" (numba): the convolution with the ReLU after it gives
    this backend's unfused chain's numbers bit for bit (relu_forward of conv2d_forward; then
    conv2d_backward of relu_backward's gradient), with or without the saved layout, and the
    naive backend's unfused chain under the NaN rule (a NaN or an infinity anywhere stays)."""
    if not _contract.has(fast, "conv2d_relu"):
        return
    y, saved = fast.conv2d_relu_forward(x, wt, b, stride, pad)
    unfused = fast.relu_forward(fast.conv2d_forward(x, wt, b, stride, pad))
    np.testing.assert_array_equal(y, unfused)
    assert not np.signbit(y[y == 0]).any()  # relu_forward's zeros are +0
    reference = NAIVE.relu_forward(NAIVE.conv2d_forward(x, wt, b, stride, pad))
    assert_nan_rule(y, reference, x.dtype, "conv + relu forward")
    g = fast.relu_backward(dy, y)
    want = fast.conv2d_backward(x, g, wt, stride, pad, True, None)
    g_ref = NAIVE.relu_backward(dy, y)  # this y: where it has an extra NaN, the mask passes dy
    want_ref = (*NAIVE.conv2d_grad_weight(x, g_ref, wt.shape[2:], stride, pad),
                NAIVE.conv2d_grad_input(g_ref, wt, x.shape, stride, pad))
    for keep in (saved, None):
        got = fast.conv2d_relu_backward(x, dy, y, wt, stride, pad, True, keep)
        for part, h, w_, r in zip(("dw", "db", "dx"), got, want, want_ref, strict=True):
            assert h.dtype == x.dtype and h.shape == w_.shape
            np.testing.assert_array_equal(h, w_, err_msg=part)
            assert_nan_rule(h, r, x.dtype, f"conv + relu backward, {part}")
    assert fast.conv2d_relu_backward(x, dy, y, wt, stride, pad, False, saved)[2] is None
    with pytest.raises(ValueError, match="y"):  # the ReLU's output must match dy
        fast.conv2d_relu_backward(x, dy, y.reshape(-1), wt, stride, pad)


def assert_fused_backward_is_the_same(fast, x, wt, b, dy, stride, pad):
    """The contract's optional pair (numba): conv2d_forward_saving gives conv2d_forward's y, and
    conv2d_backward, with or without what the forward saved, gives conv2d_grad_weight's and
    conv2d_grad_input's numbers bit for bit (NaN where they have NaN)."""
    if not _contract.has(fast, "conv2d_saved_layout"):
        return
    kernel = wt.shape[2:]
    y, saved = fast.conv2d_forward_saving(x, wt, b, stride, pad)
    np.testing.assert_array_equal(y, fast.conv2d_forward(x, wt, b, stride, pad))
    dw, db = fast.conv2d_grad_weight(x, dy, kernel, stride, pad)
    dx = fast.conv2d_grad_input(dy, wt, x.shape, stride, pad)
    for keep in (saved, None):
        got = fast.conv2d_backward(x, dy, wt, stride, pad, True, keep)
        for g, want in zip(got, (dw, db, dx), strict=True):
            assert g.dtype == want.dtype and g.shape == want.shape
            np.testing.assert_array_equal(g, want)
    assert fast.conv2d_backward(x, dy, wt, stride, pad, False, saved)[2] is None


# The numba backend's fast paths work in tiles: 3x3 stride-1 convolutions in groups of 4 filters
# and runs of 16 outputs along a row, dense layers in blocks of 4 rows and 16 columns. These shapes
# sit on and around those edges (rows longer than one tile, filter counts off the groups), which
# the random grid above, with its small planes, rarely reaches.
TILE_EDGE_CONVS = [(2, 3, 5, 33, 5, 1), (1, 2, 17, 16, 7, 0), (3, 1, 4, 15, 4, 2),
                   (2, 5, 6, 32, 9, 1), (1, 4, 3, 3, 1, 1),
                   # 8+ channels: the chunked weight gradient on AVX-512 (filters off its groups)
                   (2, 9, 7, 30, 11, 1), (2, 8, 6, 14, 8, 1)]


@pytest.mark.parametrize("case", TILE_EDGE_CONVS, ids=case_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_3x3_tile_edges_agree_with_naive(fast, rng, case, dtype):
    n, c, h, w, f, pad = case
    test_conv_agrees_with_naive(fast, rng, (n, c, h, w, f, 3, 3, 1, pad), dtype)


# Shapes the numba backend runs on its plain direct kernels (neither 3x3 nor 1x1 without
# padding), and strided 3x3 and 1x1 ones (on the stride-1 and matmul kernels): every path, in
# the run without the JIT too, whose random grid is smaller.
OTHER_PATH_CONVS = [(2, 3, 7, 6, 4, 2, 2, 2, 0), (1, 2, 9, 8, 3, 5, 5, 2, 1),
                    (2, 2, 6, 6, 3, 1, 1, 1, 1), (2, 3, 9, 8, 5, 3, 3, 2, 1),
                    (1, 2, 8, 7, 3, 3, 3, 3, 0), (2, 4, 7, 8, 6, 1, 1, 2, 0),
                    (3, 2, 5, 5, 4, 1, 1, 1, 0)]


@pytest.mark.parametrize("case", OTHER_PATH_CONVS, ids=case_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_strided_1x1_and_other_kernels_agree_with_naive(fast, rng, case, dtype):
    test_conv_agrees_with_naive(fast, rng, case, dtype)


@pytest.mark.parametrize("n, inputs, outputs", [(5, 37, 6), (4, 32, 4), (1, 1, 1), (2, 16, 9),
                                                (0, 5, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_tile_edges_agree_with_naive(fast, rng, n, inputs, outputs, dtype):
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((n, inputs), (outputs, inputs),
                                                               (outputs,)))
    np.testing.assert_allclose(fast.dense_forward(x, w, b), NAIVE.dense_forward(x, w, b),
                               **tol(dtype))
    g = rng.standard_normal((n, outputs)).astype(dtype)
    for got, want in zip(fast.dense_backward(g, x, w), NAIVE.dense_backward(g, x, w),
                         strict=True):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, **tol(dtype))


def assert_values_only_pool(fast, x, size, stride, y_ref):
    """with_argmax=False (inference) gives the same y, NaN cells included, and no argmax."""
    for k in (fast, NAIVE):
        y, arg = k.maxpool2d_forward(x, size, stride, with_argmax=False)
        assert arg is None
        np.testing.assert_array_equal(y, y_ref)


@pytest.mark.parametrize("case", pool_grid(), ids=case_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_pool_agrees_with_naive(fast, rng, case, dtype, ties):
    n, c, h, w, size, stride = case
    x = rng.integers(0, 2, (n, c, h, w)) if ties else rng.standard_normal((n, c, h, w))
    x = x.astype(dtype)
    y, arg = fast.maxpool2d_forward(x, size, stride)
    y_ref, arg_ref = NAIVE.maxpool2d_forward(x, size, stride)
    np.testing.assert_array_equal(arg, arg_ref)
    np.testing.assert_array_equal(y, y_ref)
    assert_values_only_pool(fast, x, size, stride, y_ref)
    dy = rng.standard_normal(y.shape).astype(dtype)
    np.testing.assert_allclose(fast.maxpool2d_backward(dy, arg, x.shape, size, stride),
                               NAIVE.maxpool2d_backward(dy, arg_ref, x.shape, size, stride),
                               **tol(dtype))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf - inf, inf * 0: NaN by design
@pytest.mark.parametrize("case", pool_grid(), ids=case_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_average_pooling_and_add_agree_with_naive(fast, rng, case, dtype):
    """AvgPool2D, the global average and the residual add, forward and backward, against the
    naive loops; then with NaN and infinities poisoned in (the NaN rule)."""
    n, c, h, w, size, stride = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    dy = rng.standard_normal(NAIVE.avgpool2d_forward(x, size, stride).shape).astype(dtype)
    dg = rng.standard_normal((n, c)).astype(dtype)
    for bad in (False, True):
        if bad:
            x, dy, dg = (poison(rng, a, values=(np.nan, np.inf, -np.inf)) for a in (x, dy, dg))
        pairs = [
            (fast.avgpool2d_forward(x, size, stride), NAIVE.avgpool2d_forward(x, size, stride)),
            (fast.avgpool2d_backward(dy, x.shape, size, stride),
             NAIVE.avgpool2d_backward(dy, x.shape, size, stride)),
            (fast.global_avgpool_forward(x), NAIVE.global_avgpool_forward(x)),
            (fast.global_avgpool_backward(dg, x.shape), NAIVE.global_avgpool_backward(dg, x.shape)),
            (fast.add(x, x[::-1].copy()), NAIVE.add(x, x[::-1].copy()))]
        for i, (got, want) in enumerate(pairs):
            assert got.shape == want.shape and got.dtype == dtype, i
            assert_nan_rule(got, want, dtype, f"pair {i}, poisoned {bad}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elementwise_dense_loss_agree_with_naive(fast, rng, dtype):
    x = rng.standard_normal((3, 2, 5, 4)).astype(dtype)
    y = fast.relu_forward(x)
    np.testing.assert_array_equal(y, NAIVE.relu_forward(x))
    dy = rng.standard_normal(x.shape).astype(dtype)
    np.testing.assert_array_equal(fast.relu_backward(dy, y), NAIVE.relu_backward(dy, y))
    a, w, b = (rng.standard_normal(s).astype(dtype) for s in ((3, 11), (7, 11), (7,)))
    np.testing.assert_allclose(fast.dense_forward(a, w, b), NAIVE.dense_forward(a, w, b),
                               **tol(dtype))
    g = rng.standard_normal((3, 7)).astype(dtype)
    for got, want in zip(fast.dense_backward(g, a, w), NAIVE.dense_backward(g, a, w),
                         strict=True):
        np.testing.assert_allclose(got, want, **tol(dtype))
    labels = np.array([6, 0, 3])
    loss, d = fast.softmax_cross_entropy(g, labels)
    loss_ref, d_ref = NAIVE.softmax_cross_entropy(g, labels)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    np.testing.assert_allclose(d, d_ref, **tol(dtype))


def small_net(seed):
    rng = np.random.default_rng(seed)
    return ConvNet([
        Conv2D(1, 4, 3, dtype=np.float64, rng=rng), ReLU(),
        Conv2D(4, 5, 3, stride=2, padding=1, dtype=np.float64, rng=rng), ReLU(),
        MaxPool2D(3, stride=2), Flatten(), Dense(5 * 3 * 3, 10, dtype=np.float64, rng=rng),
    ], input_shape=(1, 14, 14))


def test_one_trainer_three_backends_end_with_the_same_weights(rng):
    """The same model, seed and batches trained on each backend: the weights agree."""
    x = rng.random((12, 1, 14, 14))
    y = rng.integers(0, 10, 12)
    weights = {}
    for name in backend.available_backends():
        with use_backend(name):
            net = small_net(seed=5)
            net.fit(x, y, epochs=1, batch_size=4, lr=0.1, seed=3)
        weights[name] = [p.copy() for layer in net.layers for p in layer.params.values()]
    assert set(weights) >= {"naive", "numpy", "numba"}
    start = [p for layer in small_net(5).layers for p in layer.params.values()]
    for name, ws in weights.items():
        assert not np.allclose(ws[0], start[0])  # training moved the weights
        for got, want in zip(ws, weights["naive"], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11, err_msg=name)


def test_numba_conv_relu_fusion_trains_the_same_bits(rng, monkeypatch):
    """ConvNet runs a Conv2D and the ReLU after it as one where the backend has the contract's
    "conv2d_relu" group: training and inference give the unfused layers' bits, and the fused
    kernels are what ran (fails if the network stops fusing or the fusion changes a number)."""
    from fastcnn.kernels import numba_jit

    x, y = rng.random((12, 1, 14, 14)), rng.integers(0, 10, 12)
    calls = {"conv2d_relu_forward": 0, "conv2d_relu_backward": 0}

    def counting(name):
        kernel = getattr(numba_jit, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return kernel(*args, **kwargs)
        return counted

    for name in calls:
        monkeypatch.setattr(numba_jit, name, counting(name))

    def train():
        with use_backend("numba"):
            net = small_net(seed=5)  # two pairs: a 3x3 'same' and a strided convolution
            net.fit(x, y, epochs=1, batch_size=4, lr=0.1, seed=3)
            net.eval()
            logits = net.forward(x)
        return [p.copy() for layer in net.layers for p in layer.params.values()] + [logits]

    fused = train()
    assert calls == {"conv2d_relu_forward": 2 * 3 + 2, "conv2d_relu_backward": 2 * 3}
    monkeypatch.setattr(numba_jit, "OPTIONAL", numba_jit.OPTIONAL - {"conv2d_relu"})
    unfused = train()
    assert calls["conv2d_relu_forward"] == 8  # not called again
    for got, want in zip(fused, unfused, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_small_calls_run_serially_and_give_the_same_bits(rng, monkeypatch, dtype):
    """Below a FLOP (or value) count, the numba kernels run their serial twins on the calling
    thread: the same numbers as the parallel kernels, and the twins really run (a serial copy
    compiled under a name of its own, kept in _TWINS)."""
    from fastcnn.kernels import numba_jit as nj

    x = rng.standard_normal((2, 3, 10, 9)).astype(dtype)
    w3, w2 = (rng.standard_normal((5, 3, k, k)).astype(dtype) for k in (3, 2))
    b = rng.standard_normal(5).astype(dtype)
    a, wd = rng.standard_normal((3, 20)).astype(dtype), rng.standard_normal((7, 20)).astype(dtype)
    g, bd = rng.standard_normal((3, 7)).astype(dtype), rng.standard_normal(7).astype(dtype)

    def every_kernel():
        return [nj.conv2d_forward(x, w3, b, 1, 1), *nj.conv2d_relu_forward(x, w3, b, 1, 1),
                nj.conv2d_forward(x, w2, b, 2, 1), nj.conv2d_relu_forward(x, w2, b, 1, 0)[0],
                nj.conv2d_grad_input(nj.conv2d_forward(x, w3, b, 1, 1), w3, x.shape, 1, 1),
                *nj.maxpool2d_forward(x, 2, 2), nj.maxpool2d_forward(x, 2, 2, False)[0],
                *nj.maxpool2d_forward(x, 3, 2), nj.dense_forward(a, wd, bd),
                *nj.dense_backward(g, a, wd)]

    monkeypatch.setattr(nj, "_SERIAL_FLOPS_PER_THREAD", 0)
    monkeypatch.setattr(nj, "_POOL_PARALLEL_MIN", 0)
    monkeypatch.setattr(nj, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(nj, "_TWINS", {})
    parallel = every_kernel()
    assert not nj._TWINS
    monkeypatch.setattr(nj, "_SERIAL_FLOPS_PER_THREAD", 10**12)
    monkeypatch.setattr(nj, "_POOL_PARALLEL_MIN", 10**12)
    monkeypatch.setattr(nj, "_PARALLEL_MIN", 10**12)
    serial = every_kernel()
    for got, want in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(got, want)
    twins = {kernel.__name__ for kernel in nj._TWINS}
    assert twins >= {"_lay_out_planes", "_conv_forward", "_pool2x2_forward", "_pool2x2_values",
                     "_pool_forward", "_dense_forward", "_matmul"}
    assert nj._conv3x3_forward_s1_serial.__name__ == "_conv3x3_forward_s1_serial"


def test_an_image_gets_the_same_logits_alone_and_in_a_batch_on_numba(rng):
    """One image runs the numba backend's serial twins (too little work for the threads), a
    batch of 64 the parallel kernels: the image's logits are the same bits either way."""
    if NO_JIT:
        pytest.skip("compiled kernels only (a batch of 64 through the complex model)")
    from fastcnn.models import complex_cnn

    net = complex_cnn(seed=1)
    net.eval()
    x = rng.random((64, 1, 28, 28)).astype(np.float32)
    with use_backend("numba"):
        batch = net.forward(x)
        for i in (0, 37):
            np.testing.assert_array_equal(net.forward(x[i : i + 1])[0], batch[i])


def test_conv_relu_fusion_survives_a_backend_switch_before_backward(rng):
    """A fused forward on numba, then the backward pass on naive: the ReLU's mask is applied by
    the naive backend instead, and the gradients are naive's own (to rounding)."""
    x, y = rng.random((4, 1, 14, 14)), rng.integers(0, 10, 4)
    grads = {}
    for forward_on in ("numba", "naive"):
        net = small_net(seed=5)
        with use_backend(forward_on):
            loss = net.loss.forward(net.forward(x), y)
        with use_backend("naive"):
            net.backward(net.loss.backward())
        assert np.isfinite(loss)
        grads[forward_on] = [g.copy() for layer in net.layers for g in layer.grads.values()]
    for got, want in zip(grads["numba"], grads["naive"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


# The share of kernels/numba_jit.py's lines that the run without the JIT must execute: all. A
# line that cannot run there carries "pragma: no cover" with the reason (compiled-only code).
# The tests force every register tile and weight-gradient variant, whatever this CPU would
# pick, so the lines run do not depend on the CPU.
COVERAGE_FLOOR = 1.0


def test_numba_kernel_bodies_also_pass_as_plain_python(tmp_path):
    """NUMBA_DISABLE_JIT=1 runs the kernel bodies as Python: a bug hidden by compilation shows,
    a read past an array's end fails (the JIT's unchecked reads are checked there), and coverage
    proves that every tile edge and remainder loop ran, not only compiled."""
    if NO_JIT:
        pytest.skip("this is the run without the JIT")
    import coverage  # the dev extra's

    from fastcnn.kernels import numba_jit

    source = str(Path(numba_jit.__file__).resolve())
    data = tmp_path / "coverage.data"
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    root = Path(__file__).parent.parent
    run = subprocess.run(
        [sys.executable, "-m", "coverage", "run", f"--data-file={data}", f"--include={source}",
         "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, str(root / "tests" /
         "test_kernels.py"), "-k", "numba or one_trainer or plain_python"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
    cov = coverage.Coverage(data_file=str(data))
    cov.load()
    _, statements, _, missing, _ = cov.analysis2(source)
    share = 1 - len(missing) / len(statements)
    assert len(statements) > 500 and share >= COVERAGE_FLOOR, (
        f"{share:.1%} of numba_jit.py's {len(statements)} lines ran without the JIT (floor "
        f"{COVERAGE_FLOOR:.0%}); never run: lines {missing}: test them, or mark compiled-only "
        f"code '# pragma: no cover - <why>'")


@pytest.mark.parametrize("features, bits", [({"avx512f": True, "avx2": True}, 512),
                                            ({"avx2": True}, 256), ({"avx": True}, 256),
                                            ({"neon": True}, 128), (None, 128)])
def test_numba_vector_width_comes_from_the_cpus_features(monkeypatch, features, bits):
    """The register tiles are sized from this: AVX-512, AVX/AVX2, else 128-bit vectors (NEON,
    SSE), and the narrowest when llvmlite cannot say."""
    from llvmlite import binding

    from fastcnn.kernels import numba_jit

    def host_features():
        if features is None:
            raise RuntimeError("no feature list on this platform")
        return features

    monkeypatch.setattr(binding, "get_host_cpu_features", host_features)
    assert numba_jit._host_vector_bits() == bits


def test_plain_python_mode_is_really_plain_python():
    """In the subprocess above this proves the kernels ran uncompiled; here, that they compile."""
    from fastcnn.kernels import numba_jit

    plain = isinstance(numba_jit._conv3x3_forward_s1, types.FunctionType)
    assert plain == NO_JIT


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 4, 2), (1 << 17) + 3])  # numba: one thread, and parallel
def test_sgd_update_agrees_with_naive(fast, rng, dtype, shape):
    p = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(p.shape).astype(dtype)
    expected = p.copy()
    NAIVE.sgd_update(expected, g, 0.1)
    assert not np.allclose(expected, p)
    fast.sgd_update(p, g, 0.1)
    np.testing.assert_allclose(p, expected, **tol(dtype))
    with pytest.raises(ValueError, match="does not match"):
        fast.sgd_update(p, g[:1], 0.1)


# -- the NaN rule (kernels/_contract.py): no backend turns a NaN or an infinity into a number ----


# inf * 0 and inf - inf are NaN by design here: NumPy's warnings about them are expected
nan_ok = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def assert_nan_rule(got, want, dtype, what):
    """Where the reference is NaN, ``got`` is NaN; where it is +-inf, the same inf or NaN (a
    backend may multiply by zeros the formula never reads); elsewhere ``got`` is NaN or close."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    nan = np.isnan(want)
    assert np.isnan(got[nan]).all(), f"{what}: a NaN of the reference became a number"
    inf = np.isinf(want)
    assert (np.isnan(got[inf]) | (got[inf] == want[inf])).all(), f"{what}: an inf was lost"
    finite = np.isfinite(want) & ~np.isnan(got)
    np.testing.assert_allclose(got[finite], want[finite], **tol(dtype), err_msg=what)
    # the extra NaNs a backend may add come from zeros the formula skips, never from nowhere
    return int(np.count_nonzero(np.isnan(got) & ~nan))


def poison(rng, a, count=2, values=(np.nan,)):
    """A copy of ``a`` with ``count`` cells set to values drawn from ``values``."""
    a = a.copy()
    flat = a.reshape(-1)
    if flat.size:
        for i in rng.choice(flat.size, min(count, flat.size), replace=False):
            flat[i] = values[int(rng.integers(len(values)))]
    return a


NAN_CONVS = [(2, 3, 6, 7, 5, 3, 3, 1, 1), (2, 2, 7, 5, 3, 3, 3, 2, 1), (1, 2, 5, 18, 4, 3, 3, 1, 0),
             (2, 1, 6, 6, 2, 2, 3, 1, 2), (2, 3, 6, 7, 4, 1, 1, 1, 0)]


@nan_ok
@pytest.mark.parametrize("case", NAN_CONVS, ids=case_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_conv_keeps_nan_and_inf(fast, rng, case, dtype, bad):
    n, c, h, w, f, kh, kw, stride, pad = case
    values = (np.nan,) if bad == "nan" else (np.inf, -np.inf)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((f, c, kh, kw)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    dy = rng.standard_normal((n, f) + NAIVE.conv2d_forward(x, wt, b, stride, pad).shape[2:])
    dy = dy.astype(dtype)
    for name in ("x", "w", "b"):
        args = {"x": x, "w": wt, "b": b}
        args[name] = poison(rng, args[name], values=values)
        want = NAIVE.conv2d_forward(args["x"], args["w"], args["b"], stride, pad)
        assert not np.isfinite(want).all()
        assert_nan_rule(fast.conv2d_forward(args["x"], args["w"], args["b"], stride, pad),
                        want, dtype, f"forward, {bad} in {name}")
    for name in ("x", "dy"):
        args = {"x": x, "dy": dy}
        args[name] = poison(rng, args[name], values=values)
        got = fast.conv2d_grad_weight(args["x"], args["dy"], (kh, kw), stride, pad)
        want = NAIVE.conv2d_grad_weight(args["x"], args["dy"], (kh, kw), stride, pad)
        assert not np.isfinite(want[0]).all()
        for g, r, part in zip(got, want, ("dw", "db"), strict=True):
            assert_nan_rule(g, r, dtype, f"{part}, {bad} in {name}")
    for name in ("dy", "w"):
        args = {"dy": dy, "w": wt}
        args[name] = poison(rng, args[name], values=values)
        want = NAIVE.conv2d_grad_input(args["dy"], args["w"], x.shape, stride, pad)
        assert not np.isfinite(want).all()
        assert_nan_rule(fast.conv2d_grad_input(args["dy"], args["w"], x.shape, stride, pad),
                        want, dtype, f"dx, {bad} in {name}")
        assert_fused_backward_is_the_same(fast, x, args["w"], b, args["dy"], stride, pad)
        assert_relu_fusion_is_the_same(fast, x, args["w"], b, args["dy"], stride, pad)
    assert_fused_backward_is_the_same(fast, poison(rng, x, values=values), wt, b, dy, stride,
                                      pad)
    for name in ("x", "b"):  # through the fused ReLU: forward and both gradients
        args = {"x": x, "b": b}
        args[name] = poison(rng, args[name], values=values)
        assert_relu_fusion_is_the_same(fast, args["x"], wt, args["b"], dy, stride, pad)


@nan_ok
@pytest.mark.parametrize("case", [(2, 3, 6, 6, 2, 2), (1, 2, 7, 5, 3, 2), (2, 1, 5, 7, 2, 1)],
                         ids=case_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pool_keeps_nan_and_points_at_the_first(fast, rng, case, dtype):
    n, c, h, w, size, stride = case
    x = poison(rng, rng.standard_normal((n, c, h, w)).astype(dtype), count=h * w // 2,
               values=(np.nan, np.inf, -np.inf))
    y, arg = fast.maxpool2d_forward(x, size, stride)
    y_ref, arg_ref = NAIVE.maxpool2d_forward(x, size, stride)
    assert np.isnan(y_ref).any()
    np.testing.assert_array_equal(y, y_ref)  # NaN in the same cells (array_equal: NaN == NaN)
    np.testing.assert_array_equal(arg, arg_ref)
    assert_values_only_pool(fast, x, size, stride, y_ref)
    dy = poison(rng, rng.standard_normal(y.shape).astype(dtype))
    assert_nan_rule(fast.maxpool2d_backward(dy, arg, x.shape, size, stride),
                    NAIVE.maxpool2d_backward(dy, arg_ref, x.shape, size, stride), dtype, "dx")


@nan_ok
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [7, (1 << 17) + 5])  # the numba backend's one-thread and
def test_relu_keeps_nan_and_inf(fast, rng, dtype, size):  # parallel paths
    x = poison(rng, rng.standard_normal(size).astype(dtype), count=40,
               values=(np.nan, np.inf, -np.inf))
    y = fast.relu_forward(x)
    np.testing.assert_array_equal(y, NAIVE.relu_forward(x))
    dy = poison(rng, rng.standard_normal(size).astype(dtype), count=40,
                values=(np.nan, np.inf, -np.inf))
    np.testing.assert_array_equal(fast.relu_backward(dy, y), NAIVE.relu_backward(dy, y))


@nan_ok
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_and_loss_keep_nan(fast, rng, dtype):
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((5, 37), (6, 37), (6,)))
    for args in ((poison(rng, x), w, b), (x, poison(rng, w), b), (x, w, poison(rng, b))):
        assert_nan_rule(fast.dense_forward(*args), NAIVE.dense_forward(*args), dtype, "dense")
    dy = poison(rng, rng.standard_normal((5, 6)).astype(dtype))
    for got, want in zip(fast.dense_backward(dy, x, w), NAIVE.dense_backward(dy, x, w),
                         strict=True):
        assert_nan_rule(got, want, dtype, "dense backward")
    logits = rng.standard_normal((4, 10)).astype(dtype)
    labels = np.array([1, 2, 3, 4])
    for bad in (np.nan, np.inf):
        poisoned = logits.copy()
        poisoned[2, 5] = bad
        loss, d = fast.softmax_cross_entropy(poisoned, labels)
        loss_ref, d_ref = NAIVE.softmax_cross_entropy(poisoned, labels)
        assert np.isnan(loss) and np.isnan(loss_ref)
        assert np.isnan(d[2]).all() and np.isnan(d_ref[2]).all()
        assert_nan_rule(d, d_ref, dtype, "dlogits")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pool_with_sums_that_overflow_still_agrees(fast, rng, dtype):
    """numba's 2x2 pooling re-pools a plane whose values sum to NaN or inf: values near the
    dtype's largest make the sum overflow without any NaN, and the result must not change."""
    big = np.finfo(dtype).max
    x = (rng.choice([-1.0, 1.0], (2, 3, 6, 6)) * big * rng.uniform(0.5, 1, (2, 3, 6, 6)))
    x = x.astype(dtype)
    for size, stride in ((2, 2), (3, 1)):
        y, arg = fast.maxpool2d_forward(x, size, stride)
        y_ref, arg_ref = NAIVE.maxpool2d_forward(x, size, stride)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(arg, arg_ref)
        assert_values_only_pool(fast, x, size, stride, y_ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [(3, 5, 2), (1 << 17) + 3])  # numba: one thread, and parallel
@pytest.mark.parametrize("kind", ["momentum", "nesterov", "adam", "adamw"])
def test_optimizer_updates_agree_with_naive(fast, rng, dtype, size, kind):
    p0 = rng.standard_normal(size).astype(dtype)
    grads = [rng.standard_normal(size).astype(dtype) for _ in range(3)]
    results = []
    for k in (NAIVE, fast):
        p, a, b = p0.copy(), np.zeros(size, dtype), np.zeros(size, dtype)
        for step, g in enumerate(grads, 1):
            if kind in ("momentum", "nesterov"):
                k.sgd_momentum_update(p, g, a, 0.1, 0.9, 0.01, kind == "nesterov")
            else:
                k.adam_update(p, g, a, b, 0.01, 0.9, 0.999, 1e-8, 0.01, kind == "adamw", step)
        results.append((p, a, b))
    assert not np.allclose(results[0][0], p0)
    for got, want in zip(results[1], results[0], strict=True):
        np.testing.assert_allclose(got, want, **tol(dtype))


BN_SHAPES = [(4, 3, 10), (2, 5, 1), (64, 3, 1), (1, 2, 37), (3, 1, 4)]


@pytest.mark.parametrize("shape", BN_SHAPES, ids=case_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batchnorm_agrees_with_naive(fast, rng, shape, dtype):
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)  # a mean far from 0
    gamma, beta = (rng.standard_normal(shape[1]).astype(dtype) for _ in range(2))
    got, want = fast.batchnorm_forward(x, gamma, beta, 1e-5), \
        NAIVE.batchnorm_forward(x, gamma, beta, 1e-5)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, **tol(dtype))
    _, mean, var = want
    np.testing.assert_allclose(
        fast.batchnorm_inference(x, gamma, beta, mean, var, 1e-3),
        NAIVE.batchnorm_inference(x, gamma, beta, mean, var, 1e-3), **tol(dtype))
    dy = rng.standard_normal(shape).astype(dtype)
    for g, w in zip(fast.batchnorm_backward(dy, x, gamma, mean, var, 1e-5),
                    NAIVE.batchnorm_backward(dy, x, gamma, mean, var, 1e-5), strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, **tol(dtype))


@nan_ok
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batchnorm_and_dropout_keep_nan(fast, rng, dtype):
    x = poison(rng, rng.standard_normal((4, 3, 6)).astype(dtype))
    gamma, beta = np.ones(3, dtype), np.zeros(3, dtype)
    for g, w in zip(fast.batchnorm_forward(x, gamma, beta, 1e-5),
                    NAIVE.batchnorm_forward(x, gamma, beta, 1e-5), strict=True):
        assert_nan_rule(g, w, dtype, "batchnorm")
    keep = rng.random(x.shape) < 0.5
    np.testing.assert_array_equal(fast.dropout(x, keep, 2.0), NAIVE.dropout(x, keep, 2.0))
    assert np.isnan(NAIVE.dropout(x, np.zeros(x.shape, bool), 2.0)[np.isnan(x)]).all()


@pytest.mark.parametrize("size", [(3, 4, 5), (1 << 17) + 7])  # numba: one thread, and parallel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_agrees_with_naive(fast, rng, size, dtype):
    x = rng.standard_normal(size).astype(dtype)
    keep = rng.random(size) < 0.7
    np.testing.assert_array_equal(fast.dropout(x, keep, 1 / 0.7), NAIVE.dropout(x, keep, 1 / 0.7))


# Every register tile the numba backend can pick (conv_tile chooses by the CPU's vectors and the
# row length), forced one by one, on rows shorter and longer than a tile and filter counts off
# the groups: a tile too wide for this CPU is only slower here, never wrong, so all are tested.
NUMBA_TILES = [(4, 16), (8, 16), (8, 32), (8, 8), (4, 8), (8, 4), (2, 64)]


@pytest.mark.parametrize("tile", NUMBA_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("case", [(2, 3, 5, 33, 5, 1), (1, 2, 28, 28, 9, 1), (2, 4, 14, 14, 8, 1),
                                  (1, 1, 7, 3, 3, 0), (3, 2, 4, 17, 12, 1), (2, 2, 7, 7, 3, 1),
                                  (2, 1, 1, 1, 2, 1)], ids=case_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_every_register_tile_agrees_with_naive(rng, tile, case, dtype):
    from fastcnn.kernels import numba_jit

    n, c, h, w, f, pad = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((f, c, 3, 3)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    want = NAIVE.conv2d_forward(x, wt, b, 1, pad)
    got = numba_jit._forward(x, wt, b, 1, pad, pad, want.shape, tile=tile)
    np.testing.assert_allclose(got, want, **tol(dtype))


@pytest.mark.parametrize("tile", NUMBA_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("serial", [False, True], ids=["parallel", "serial"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_every_matmul_tile_agrees_with_float64(rng, tile, serial, dtype):
    """The matrix product behind 1x1 and strided convolutions and the dense layers' gradients,
    on every register tile, parallel and serial: rows off the row groups, columns past the
    last full tile."""
    from fastcnn.kernels import numba_jit

    fb, v = tile
    m, r, k = fb + 3, 5, 3 * v + 7
    a = rng.standard_normal((m, r)).astype(dtype)
    b = rng.standard_normal((r, k)).astype(dtype)
    out = np.full((m, k), np.nan, dtype)
    numba_jit._tiled_matmul(fb, v, serial)(numba_jit._row_groups(a, fb), b, out)
    np.testing.assert_allclose(out, a.astype(np.float64) @ b, **tol(dtype))


@pytest.mark.parametrize("k", [40, 1000], ids=["few_columns", "many_columns"])
def test_numba_matmul_takes_either_tile_and_agrees(rng, k):
    from fastcnn.kernels import numba_jit

    a = rng.standard_normal((9, 33)).astype(np.float32)
    b = rng.standard_normal((33, k)).astype(np.float32)
    out = numba_jit._matmul_into(a, b, np.full((9, k), np.nan, np.float32))
    np.testing.assert_allclose(out, a.astype(np.float64) @ b, **tol(np.float32))


def test_numba_tile_choice_follows_the_vectors():
    from fastcnn.kernels.numba_jit import conv_tile

    assert conv_tile(28, 4, bits=256, registers=16) == (4, 16)  # AVX2: the tuned 4 x 16
    assert conv_tile(28, 4, bits=512, registers=32) == (8, 32)  # AVX-512, long rows
    assert conv_tile(14, 4, bits=512, registers=32) == (8, 32)  # AVX-512, across short rows
    assert conv_tile(28, 8, bits=512, registers=32) == (8, 16)  # float64: half the lanes
    assert conv_tile(14, 4, bits=128, registers=32) == (8, 8)   # NEON
    assert conv_tile(7, 4, bits=256, registers=16) == (8, 8)    # AVX2, 7-wide rows
    for bits, regs in ((128, 16), (256, 16), (512, 32), (128, 32)):
        for ow in (1, 3, 7, 14, 28, 100):
            for size in (4, 8):
                fb, v = conv_tile(ow, size, bits, regs)
                lanes = bits // (8 * size)
                assert 1 <= fb <= 8 and v % lanes == 0 and fb * v // lanes <= regs // 2


@pytest.mark.parametrize("fb", [0, 4, 8], ids=lambda fb: f"filters{fb}")
@pytest.mark.parametrize("case", [(2, 3, 5, 33, 5, 1), (1, 2, 28, 28, 9, 1), (3, 4, 14, 14, 8, 1),
                                  (1, 1, 7, 3, 3, 0), (40, 2, 9, 9, 12, 1)], ids=case_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_every_weight_gradient_variant_agrees_with_naive(rng, fb, case, dtype):
    """The AVX2 kernel (0) and the chunked one by 4 and 8 filters (the last case spans several
    chunks of positions), whichever this CPU would pick."""
    from fastcnn.kernels import numba_jit

    n, c, h, w, f, pad = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    dy = rng.standard_normal((n, f, h + 2 * pad - 2, w + 2 * pad - 2)).astype(dtype)
    want = NAIVE.conv2d_grad_weight(x, dy, 3, 1, pad)
    for got, ref in zip(numba_jit._grad_weight_3x3(x, dy, pad, fb), want, strict=True):
        assert got.shape == ref.shape and got.dtype == dtype
        # sums of thousands of float32 products: the rounding scales with the largest sum
        limits = dict(tol(dtype), atol=tol(dtype)["atol"] * max(1.0, float(np.abs(ref).max())))
        np.testing.assert_allclose(got, ref, **limits)


def test_numba_fused_backward_refuses_a_layout_of_another_input(rng):
    from fastcnn.kernels import numba_jit

    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    _, saved = numba_jit.conv2d_forward_saving(x, w, np.zeros(4, np.float32), 1, 1)
    dy = np.ones((2, 4, 6, 6), np.float32)
    other = rng.standard_normal((3, 3, 6, 6)).astype(np.float32)  # a batch of 3, not 2
    dy3 = np.ones((3, 4, 6, 6), np.float32)
    with pytest.raises(ValueError, match="layout of another input"):
        numba_jit.conv2d_backward(other, dy3, w, 1, 1, True, saved[:, :10])
    with pytest.raises(ValueError, match="layout of another input"):
        numba_jit.conv2d_backward(x, dy, w, 1, 1, True, saved.astype(np.float64))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_weight_gradient_tiles_of_any_channel_block_give_the_same_bits(rng, dtype):
    """The chunked weight gradient cuts its work into parts x filter groups x channel blocks
    (so that batch 10 offers many cores enough tasks); the block changes no sum."""
    from fastcnn.kernels import numba_jit as nj

    n, c, h, f = 2, 9, 7, 16
    x = rng.standard_normal((n, c, h, h)).astype(dtype)
    dy = rng.standard_normal((n, f, h, h)).astype(dtype)
    hp = wp = h + 2
    xf = nj._channel_planes(x, 1, 1, hp, wp)
    dyf = nj._channel_planes(dy, 0, 0, hp, wp, channels=f)
    positions = n * hp * wp - 2 * wp - 2
    results = []
    for cb in (1, 2, 4, 9):
        parts = np.zeros((-(-positions // nj._WG_PART), f, c, 3, 3), dtype)
        nj._chunked_grad_weight(8)(xf, dyf, wp, parts, positions, 0, cb)
        results.append(parts)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    assert results[0].any()
    assert nj.grad_weight_channel_block(32, 12) == 4  # conv2 at batch 10: 12 tasks -> 96
    assert nj.grad_weight_channel_block(64, 8) == 4 and nj.grad_weight_channel_block(8, 300) == 8
    assert nj.grad_weight_channel_block(6, 1) == 6  # never a block under 4 channels
