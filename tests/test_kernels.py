"""Every backend's kernels against the loop reference in tests/reference.py."""

import inspect

import numpy as np
import pytest

from fastcnn import backend
from fastcnn.kernels import _contract

import reference as ref
from reference import tol

# (N, C, H, W, F, KH, KW, stride, pad): odd and non-square planes, kernels 1/2x3/3/5,
# strides 1/2/3, pads 0/1/2, batch 1 and many, one and many channels.
CONV_CASES = [
    (1, 1, 5, 5, 1, 3, 3, 1, 0),
    (2, 3, 7, 5, 4, 3, 3, 2, 1),
    (1, 2, 6, 9, 3, 5, 5, 1, 2),
    (3, 1, 4, 4, 2, 1, 1, 1, 0),
    (2, 2, 8, 7, 3, 2, 3, 2, 1),
    (1, 4, 5, 6, 2, 3, 3, 3, 1),
    (2, 1, 28, 28, 8, 3, 3, 1, 1),
]
# (N, C, H, W, size, stride): odd planes that drop a row, overlapping windows, size 1.
POOL_CASES = [
    (1, 1, 4, 4, 2, 2),
    (2, 3, 7, 5, 2, 2),
    (1, 2, 6, 6, 3, 2),
    (2, 1, 5, 7, 3, 1),
    (1, 1, 4, 4, 1, 1),
]
DTYPES = [np.float32, np.float64]


def test_every_backend_has_the_contract_with_the_same_signatures():
    names = backend.available_backends()
    assert names, "no backend imports"
    for name in names:
        module = backend.load(name)
        for kernel, signature in _contract.SIGNATURES.items():
            assert hasattr(module, kernel), f"{name} lacks {kernel}"
            assert str(inspect.signature(getattr(module, kernel))) == signature, \
                f"{name}.{kernel} has another signature than the contract's {signature}"


def test_optional_kernels_come_in_whole_groups_with_the_declared_signatures():
    """A backend has all of an optional group, as it declares in OPTIONAL, or none of it."""
    declared_somewhere = set()
    for name in backend.available_backends():
        module = backend.load(name)
        assert isinstance(module.OPTIONAL, frozenset)
        assert module.OPTIONAL <= set(_contract.OPTIONAL_KERNELS), f"{name}: unknown groups"
        for group, kernels in _contract.OPTIONAL_KERNELS.items():
            if _contract.has(module, group):
                declared_somewhere.add(group)
                for kernel, signature in kernels.items():
                    assert hasattr(module, kernel), f"{name} declares {group} but lacks {kernel}"
                    assert str(inspect.signature(getattr(module, kernel))) == signature, \
                        f"{name}.{kernel}"
            else:
                present = [k for k in kernels if hasattr(module, k)]
                assert not present, f"{name} has {present} of {group} without declaring it"
    assert declared_somewhere == set(_contract.OPTIONAL_KERNELS)  # each group is tested
    with pytest.raises(ValueError, match="Unknown optional kernel group 'fused'"):
        _contract.has(module, "fused")


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_matches_loops(k, rng, case, dtype):
    n, c, h, w, f, kh, kw, stride, pad = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((f, c, kh, kw)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    y = k.conv2d_forward(x, wt, b, stride, pad)
    expected = ref.conv2d(x, wt, b, stride, pad)
    assert y.shape == expected.shape and y.dtype == dtype
    np.testing.assert_allclose(y, expected, **tol(dtype))

    dy = rng.standard_normal(y.shape).astype(dtype)
    dx_ref, dw_ref, db_ref = ref.conv2d_grads(x, wt, dy, stride, pad)
    dw, db = k.conv2d_grad_weight(x, dy, (kh, kw), stride, pad)
    dx = k.conv2d_grad_input(dy, wt, x.shape, stride, pad)
    assert (dw.shape, db.shape, dx.shape) == (wt.shape, b.shape, x.shape)
    assert dw.dtype == db.dtype == dx.dtype == dtype
    np.testing.assert_allclose(dw, dw_ref, **tol(dtype))
    np.testing.assert_allclose(db, db_ref, **tol(dtype))
    np.testing.assert_allclose(dx, dx_ref, **tol(dtype))


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool_matches_loops(k, rng, case, dtype):
    n, c, h, w, size, stride = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    y, arg = k.maxpool2d_forward(x, size, stride)
    y_ref, arg_ref = ref.maxpool2d(x, size, stride)
    assert y.shape == y_ref.shape and y.dtype == dtype
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(arg, arg_ref)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = k.maxpool2d_backward(dy, arg, x.shape, size, stride)
    assert dx.shape == x.shape and dx.dtype == dtype
    np.testing.assert_allclose(dx, ref.maxpool2d_backward(dy, arg_ref, x.shape), **tol(dtype))


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_avgpool_matches_loops(k, rng, case, dtype):
    n, c, h, w, size, stride = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    y = k.avgpool2d_forward(x, size, stride)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, ref.avgpool2d(x, size, stride), **tol(dtype))
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = k.avgpool2d_backward(dy, x.shape, size, stride)
    assert dx.shape == x.shape and dx.dtype == dtype
    np.testing.assert_allclose(dx, ref.avgpool2d_backward(dy, x.shape, size, stride),
                               **tol(dtype))
    g = k.global_avgpool_forward(x)
    assert g.shape == (n, c) and g.dtype == dtype
    np.testing.assert_allclose(g, x.astype(np.float64).mean(axis=(2, 3)), **tol(dtype))
    dg = rng.standard_normal((n, c)).astype(dtype)
    dxg = k.global_avgpool_backward(dg, x.shape)
    assert dxg.shape == x.shape and dxg.dtype == dtype
    np.testing.assert_allclose(dxg, np.broadcast_to(dg[:, :, None, None] / (h * w), x.shape),
                               **tol(dtype))
    b = rng.standard_normal(x.shape).astype(dtype)
    np.testing.assert_array_equal(k.add(x, b), x + b)


def test_pooling_and_add_reject_bad_input(k):
    x = np.zeros((2, 3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        k.avgpool2d_forward(x, 5, 1)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 2, 2\)"):
        k.avgpool2d_backward(np.zeros((2, 3, 3, 3), np.float32), x.shape, 2, 2)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3\)"):
        k.global_avgpool_backward(np.zeros((3, 2), np.float32), x.shape)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        k.global_avgpool_forward(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="same shape"):
        k.add(x, np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(TypeError, match="float64"):
        k.add(x, np.zeros(x.shape, np.float64))


@pytest.mark.parametrize("size,stride", [(2, 2), (3, 1), (3, 2)])
def test_maxpool_ties_go_to_the_first_maximum(k, rng, size, stride):
    # Values from {0, 1, 2} make most windows tie; constant planes tie everywhere.
    x = rng.integers(0, 3, (2, 2, 7, 6)).astype(np.float32)
    x[1, 1] = 5.0
    y, arg = k.maxpool2d_forward(x, size, stride)
    y_ref, arg_ref = ref.maxpool2d(x, size, stride)
    np.testing.assert_array_equal(arg, arg_ref)
    np.testing.assert_array_equal(y, y_ref)
    # On the constant plane every window's first cell is its top-left corner.
    oh, ow = y.shape[2:]
    corners = (np.arange(oh)[:, None] * stride) * 6 + np.arange(ow) * stride
    np.testing.assert_array_equal(arg[1, 1], corners)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_dense_softmax_match_reference(k, rng, dtype):
    x = rng.standard_normal((4, 7)).astype(dtype)
    y = k.relu_forward(x)
    np.testing.assert_array_equal(y, np.where(x > 0, x, 0))
    dy = rng.standard_normal(x.shape).astype(dtype)
    np.testing.assert_array_equal(k.relu_backward(dy, y), np.where(x > 0, dy, 0))

    w = rng.standard_normal((3, 7)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    out = k.dense_forward(x, w, b)
    assert out.shape == (4, 3) and out.dtype == dtype
    np.testing.assert_allclose(out, x @ w.T + b, **tol(dtype))
    g = rng.standard_normal((4, 3)).astype(dtype)
    dx, dw, db = k.dense_backward(g, x, w)
    np.testing.assert_allclose(dx, g @ w, **tol(dtype))
    np.testing.assert_allclose(dw, g.T @ x, **tol(dtype))
    np.testing.assert_allclose(db, g.sum(0), **tol(dtype))

    logits = (10 * rng.standard_normal((5, 4))).astype(dtype)
    labels = np.array([0, 3, 1, 1, 2])
    loss, dlogits = k.softmax_cross_entropy(logits, labels)
    loss_ref, grad_ref = ref.softmax_cross_entropy(logits, labels)
    assert dlogits.dtype == dtype
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    np.testing.assert_allclose(dlogits, grad_ref, **tol(dtype))


def test_softmax_is_stable_for_huge_logits(k):
    logits = np.array([[1000.0, 0.0, -1000.0]], np.float32)
    loss, d = k.softmax_cross_entropy(logits, np.array([0]))
    assert np.isfinite(loss) and loss == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.isfinite(d))


def test_kernels_reject_bad_input(k):
    x = np.zeros((1, 2, 5, 5), np.float32)
    w = np.zeros((3, 2, 3, 3), np.float32)
    b = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="input channels"):
        k.conv2d_forward(x, np.zeros((3, 1, 3, 3), np.float32), b, 1, 0)
    with pytest.raises(TypeError, match="float64"):
        k.conv2d_forward(x, w.astype(np.float64), b, 1, 0)
    with pytest.raises(TypeError, match="float16"):
        k.conv2d_forward(x.astype(np.float16), w, b, 1, 0)
    with pytest.raises(ValueError, match="does not fit"):
        k.conv2d_forward(x, np.zeros((3, 2, 7, 7), np.float32), b, 1, 0)
    with pytest.raises(ValueError, match="stride"):
        k.conv2d_forward(x, w, b, 0, 0)
    with pytest.raises(ValueError, match="dy"):
        k.conv2d_grad_input(np.zeros((1, 3, 4, 4), np.float32), w, x.shape, 1, 0)
    with pytest.raises(ValueError, match="does not fit"):
        k.maxpool2d_forward(x, 6, 1)
    with pytest.raises(ValueError, match="labels"):
        k.softmax_cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 3]))
    dy = np.ones((1, 2, 2, 2), np.float32)
    for bad in (-1, 25):
        argmax = np.zeros(dy.shape, np.int64)
        argmax[0, 1, 1, 0] = bad
        with pytest.raises(ValueError, match=r"argmax values must lie in \[0, 25\).*1 do not"):
            k.maxpool2d_backward(dy, argmax, x.shape, 2, 2)
    with pytest.raises(TypeError, match="y must be float32 or float64, got complex128"):
        k.relu_backward(np.ones(3, np.float64), np.ones(3, np.complex128))
    with pytest.raises(TypeError, match="y has dtype float32"):
        k.relu_backward(np.ones(3, np.float64), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="logits has no rows"):
        k.softmax_cross_entropy(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="lr must be a finite number"):
        k.sgd_update(np.ones(3), np.ones(3), np.float64(np.nan))


def test_sgd_update_takes_numpy_scalars(k):
    for lr in (np.float32(0.5), np.float64(0.5), np.int64(1), 0.5):
        p = np.ones(4, np.float32)
        k.sgd_update(p, np.full(4, 2, np.float32), lr)
        np.testing.assert_array_equal(p, 1 - 2 * float(lr))


# The NaN rule of the contract, spelled out on small cases (tests/test_conformance.py checks that
# every backend agrees with naive on random ones): what each kernel does with NaN and infinities.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_nan_rule(k, dtype):
    nan, inf = np.nan, np.inf
    x = np.array([nan, -1.0, 2.0, inf, -inf, 0.0], dtype)
    y = k.relu_forward(x)
    np.testing.assert_array_equal(y, np.array([nan, 0, 2, inf, 0, 0], dtype))
    dy = np.array([1.0, nan, nan, inf, -inf, 3.0], dtype)
    # dy where y > 0 or y is NaN, else dy * 0 (NaN for a NaN or infinite dy)
    np.testing.assert_array_equal(k.relu_backward(dy, y), np.array([1, nan, nan, inf, nan, 0],
                                                                    dtype))
    plane = np.array([[[[1.0, 5.0, 0.0, -1.0],
                        [nan, 2.0, 0.0, nan],
                        [3.0, nan, -inf, -inf],
                        [0.0, 9.0, -inf, nan]]]], dtype)
    pooled, arg = k.maxpool2d_forward(plane, 2, 2)
    np.testing.assert_array_equal(pooled, np.array([[[[nan, nan], [nan, nan]]]], dtype))
    # the first NaN of each window in row-major order: (1, 0), (1, 3), (2, 1), (3, 3)
    np.testing.assert_array_equal(arg, np.array([[[[4, 7], [9, 15]]]]))
    w = np.ones((1, 1, 3, 3), dtype)
    out = k.conv2d_forward(plane[:, :, :3, :3], w, np.zeros(1, dtype), 1, 0)
    assert np.isnan(out).all()
    loss, d = k.softmax_cross_entropy(np.array([[0.0, nan], [1.0, 2.0]], dtype),
                                      np.array([0, 1]))
    assert np.isnan(loss) and np.isnan(d[0]).all() and np.isfinite(d[1]).all()


def test_the_nan_rule_matches_pytorch(k, rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 3, 6, 6))
    x[0, 1, 2, 3] = x[1, 2, 0, 0] = x[1, 0, 5, 5] = np.nan
    x[0, 0, 1, 1] = np.inf
    tx = torch.from_numpy(x)
    np.testing.assert_array_equal(k.relu_forward(x), torch.relu(tx).numpy())
    pooled, _ = k.maxpool2d_forward(x, 2, 2)
    np.testing.assert_array_equal(pooled, torch.nn.functional.max_pool2d(tx, 2).numpy())
    for got, want in ((k.avgpool2d_forward(x, 2, 2), torch.nn.functional.avg_pool2d(tx, 2)),
                      (k.global_avgpool_forward(x), tx.mean(dim=(2, 3)))):
        assert (np.isnan(got) == np.isnan(want.numpy())).all()
        assert (np.isinf(got) == np.isinf(want.numpy())).all()


@pytest.mark.parametrize("size,stride", [(2, 2), (3, 1), (3, 2)])
def test_average_pooling_matches_pytorch(k, rng, size, stride):
    """Forward and input gradient of AvgPool2D and the global average against autograd."""
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 3, 7, 6))
    tx = torch.from_numpy(x).requires_grad_()
    for ours, theirs in (
            (lambda a: k.avgpool2d_forward(a, size, stride),
             lambda t: torch.nn.functional.avg_pool2d(t, size, stride)),
            (k.global_avgpool_forward, lambda t: t.mean(dim=(2, 3)))):
        y = ours(x)
        ty = theirs(tx)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
        dy = rng.standard_normal(y.shape)
        tx.grad = None
        ty.backward(torch.from_numpy(dy))
        dx = (k.avgpool2d_backward(dy, x.shape, size, stride) if y.ndim == 4
              else k.global_avgpool_backward(dy, x.shape))
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_a_padding_too_large_to_allocate_is_named_before_allocating(k):
    """pad 10**6 on a 28x28 image asked NumPy for 116 TiB ("Unable to allocate ...")."""
    x = np.zeros((1, 1, 28, 28), np.float32)
    w = np.zeros((2, 1, 3, 3), np.float32)
    dy = np.zeros((1, 2, 3, 3), np.float32)
    calls = [lambda: k.conv2d_forward(x, w, np.zeros(2, np.float32), 1, 10**6),
             lambda: k.conv2d_grad_weight(x, dy, 3, 1, 10**6),
             lambda: k.conv2d_grad_input(dy, w, x.shape, 1, 10**6)]
    for call in calls:
        with pytest.raises(ValueError, match=r"the padded input would be \(1, 1, 2000028, "
                                             r"2000028\): 4,000,112,000,784 values, more than a "
                                             r"kernel call takes .* padding \(1000000\)"):
            call()
