"""The ``numpy`` backend: vectorized NumPy, im2col through stride tricks plus BLAS matmul.

No Python loop runs over images or pixels. The only loops are over the KH*KW taps of a kernel
(col2im in the input gradient), each of which is one whole-array operation.
The contract (shapes, dtypes, argmax format, tie rule) is in ``_contract.py``.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import _contract as c

# The optional kernel groups of the contract that this backend has (_contract.OPTIONAL_KERNELS).
OPTIONAL = frozenset()


def _pad(x, pad):
    if pad == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


def _im2col(x, kh, kw, stride, pad, oh, ow):
    """(N, C, H, W) -> (N, C*KH*KW, OH*OW): column j of image n holds the window of output j."""
    xp = _pad(x, pad)
    n, ch = x.shape[:2]
    sn, sc, sh, sw = xp.strides
    # A read-only view (N, C, KH, KW, OH, OW); the reshape below is the one copy.
    win = as_strided(
        xp,
        shape=(n, ch, kh, kw, oh, ow),
        strides=(sn, sc, sh, sw, sh * stride, sw * stride),
        writeable=False,
    )
    return win.reshape(n, ch * kh * kw, oh * ow)


def conv2d_forward(x, w, b, stride, pad):
    """y[n, f, i, j] = b[f] + sum_{c,p,q} w[f, c, p, q] * xpad[n, c, i*stride + p, j*stride + q]."""
    stride, pad, (n, f, oh, ow) = c.check_conv_forward(x, w, b, stride, pad)
    cols = _im2col(x, w.shape[2], w.shape[3], stride, pad, oh, ow)
    y = np.matmul(w.reshape(f, -1), cols)  # (N, F, OH*OW), one GEMM per image
    y += b[:, None]
    return y.reshape(n, f, oh, ow)


def conv2d_grad_weight(x, dy, kernel_size, stride, pad):
    """dw[f, c, p, q] = sum_{n,i,j} dy[n, f, i, j] * xpad[n, c, i*stride + p, j*stride + q]."""
    (kh, kw), stride, pad = c.check_conv_grad_weight(x, dy, kernel_size, stride, pad)
    n, f, oh, ow = dy.shape
    cols = _im2col(x, kh, kw, stride, pad, oh, ow)
    # One GEMM per image against the transposed view of its columns (BLAS reads it transposed,
    # nothing is copied), then the sum over the batch.
    dw = np.matmul(dy.reshape(n, f, -1), cols.transpose(0, 2, 1)).sum(axis=0)
    return dw.reshape(f, x.shape[1], kh, kw), dy.sum(axis=(0, 2, 3))


def conv2d_grad_input(dy, w, input_shape, stride, pad):
    """dx[n, c, h, v] = sum over the (f, i, j, p, q) with i*stride + p = h + pad, j*stride + q = v +
    pad of w[f, c, p, q] * dy[n, f, i, j] (col2im of w^T dy)."""
    (n, ch, h, wd), stride, pad = c.check_conv_grad_input(dy, w, input_shape, stride, pad)
    f, _, kh, kw = w.shape
    if stride == 1 and kh == kw and pad < kh:
        # With stride 1 the input gradient is itself a convolution: of dy padded by K-1-pad with
        # the kernels flipped and their in/out channels swapped; im2col + GEMM beats col2im here.
        w_t = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        return conv2d_forward(dy, w_t, np.zeros(ch, dy.dtype), 1, kh - 1 - pad)
    oh, ow = dy.shape[2:]
    dcols = np.matmul(w.reshape(f, -1).T, dy.reshape(n, f, -1)).reshape(n, ch, kh, kw, oh, ow)
    dxp = np.zeros((n, ch, h + 2 * pad, wd + 2 * pad), dtype=dy.dtype)
    for p in range(kh):
        for q in range(kw):
            rows = slice(p, p + stride * oh, stride)
            cols = slice(q, q + stride * ow, stride)
            dxp[:, :, rows, cols] += dcols[:, :, p, q]
    return np.ascontiguousarray(dxp[:, :, pad : pad + h, pad : pad + wd])


def maxpool2d_forward(x, size, stride, with_argmax=True):
    """y[n, c, i, j] = max of the size x size window at (i*stride, j*stride); argmax is where
    (None unless with_argmax)."""
    size, stride, (n, ch, oh, ow) = c.check_pool_forward(x, size, stride)
    w = x.shape[3]
    # One whole-array pass per window position (p, q), in row-major order: a cell moves to a
    # later position only when strictly greater, so ties keep the first maximum (the contract);
    # a NaN counts as larger than every number.
    y = x[:, :, : stride * oh : stride, : stride * ow : stride].copy()
    k = np.zeros(y.shape, np.int64) if with_argmax else None
    for p in range(size):
        for q in range(size):
            if p == q == 0:
                continue
            v = x[:, :, p : p + stride * oh : stride, q : q + stride * ow : stride]
            better = (v > y) | (np.isnan(v) & ~np.isnan(y))  # NOTE: the first NaN wins
            np.copyto(y, v, where=better)
            if with_argmax:
                np.copyto(k, p * w + q, where=better)
    if not with_argmax:
        return y, None
    corner = (np.arange(oh)[:, None] * stride) * w + np.arange(ow) * stride
    return y, k + corner


def maxpool2d_backward(dy, argmax, input_shape, size, stride):
    """dx[n, c, h, w] = sum of dy[n, c, i, j] over the cells whose argmax is h*W + w."""
    (n, ch, h, w), size, stride = c.check_pool_backward(dy, argmax, input_shape, size, stride)
    c.check_argmax_range(argmax, h, w)
    plane = np.arange(n * ch).reshape(n, ch, 1, 1) * (h * w)
    # bincount sums every weight that lands on one index: overlapping windows accumulate.
    dx = np.bincount((plane + argmax).ravel(), weights=dy.ravel(), minlength=n * ch * h * w)
    return dx.astype(dy.dtype, copy=False).reshape(n, ch, h, w)


def _windows(size, stride, oh, ow):
    """(p, q, the rows and columns of x that tap (p, q) of every window reads), row-major."""
    for p in range(size):
        for q in range(size):
            yield (slice(p, p + stride * (oh - 1) + 1, stride),
                   slice(q, q + stride * (ow - 1) + 1, stride))


def avgpool2d_forward(x, size, stride):
    """Each window's mean: its size^2 taps summed as strided views of x, in row-major order."""
    size, stride, (n, ch, oh, ow) = c.check_pool_forward(x, size, stride)
    total = np.zeros((n, ch, oh, ow), x.dtype)
    for rows, cols in _windows(size, stride, oh, ow):
        total += x[:, :, rows, cols]
    return total / x.dtype.type(size * size)


def avgpool2d_backward(dy, input_shape, size, stride):
    """dy / size^2 added to every tap of its window (overlapping windows accumulate)."""
    (n, ch, h, w), size, stride = c.check_avgpool_backward(dy, input_shape, size, stride)
    dx = np.zeros((n, ch, h, w), dy.dtype)
    share = dy / dy.dtype.type(size * size)
    for rows, cols in _windows(size, stride, *dy.shape[2:]):
        dx[:, :, rows, cols] += share
    return dx


def global_avgpool_forward(x):
    """(N, C, H, W) -> (N, C): each plane's mean."""
    c.check_array("x", x, 4)
    n, ch, h, w = x.shape
    return x.reshape(n, ch, h * w).sum(axis=2) / x.dtype.type(h * w)


def global_avgpool_backward(dy, input_shape):
    """dy[n, c] / (H * W) spread over its plane."""
    n, ch, h, w = c.check_global_avgpool_backward(dy, input_shape)
    share = dy / dy.dtype.type(h * w)
    return np.ascontiguousarray(np.broadcast_to(share[:, :, None, None], (n, ch, h, w)))


def add(a, b):
    """a + b, elementwise."""
    c.check_add(a, b)
    return a + b


def relu_forward(x):
    """y = max(x, 0), elementwise (np.maximum propagates NaN)."""
    c.check_array("x", x)
    return np.maximum(x, 0)


def relu_backward(dy, y):
    """dx = dy where the forward output y was not <= 0 (positive or NaN), else dy * 0."""
    c.check_relu_backward(dy, y)
    return dy * ~(y <= 0)  # NOTE: dy * 0 keeps a NaN or infinite dy NaN


def dense_forward(x, w, b):
    """y = x w^T + b: x (N, IN), w (OUT, IN), b (OUT,)."""
    c.check_dense_forward(x, w, b)
    return x @ w.T + b


def dense_backward(dy, x, w):
    """dx = dy w, dw = dy^T x, db = sum_n dy."""
    c.check_dense_backward(dy, x, w)
    return dy @ w, dy.T @ x, dy.sum(axis=0)


def softmax_cross_entropy(logits, labels):
    """loss = mean_n(logsumexp(logits[n]) - logits[n, labels[n]]);
    dlogits = (softmax(logits) - onehot(labels)) / N."""
    c.check_softmax_cross_entropy(logits, labels)
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)  # NOTE: shift so exp cannot overflow
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, labels]))
    dlogits = exp / total
    dlogits[rows, labels] -= 1
    dlogits /= n
    return loss, dlogits


def sgd_update(param, grad, lr):
    """param -= lr * grad, in place."""
    c.check_sgd_update(param, grad, lr)
    param -= param.dtype.type(lr) * grad


def sgd_momentum_update(param, grad, velocity, lr, momentum, weight_decay, nesterov):
    """torch.optim.SGD's step (dampening 0), in place: velocity = momentum * velocity + g with
    g = grad + weight_decay * param; param -= lr * (g + momentum * velocity if nesterov else
    velocity)."""
    lr, momentum, weight_decay = c.check_sgd_momentum_update(param, grad, velocity, lr, momentum,
                                                             weight_decay)
    t = param.dtype.type
    g = grad + t(weight_decay) * param if weight_decay else grad
    velocity *= t(momentum)
    velocity += g
    param -= t(lr) * (g + t(momentum) * velocity if nesterov else velocity)


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step):
    """torch.optim.Adam's step (AdamW's when decoupled), in place on param, m and v."""
    lr, beta1, beta2, eps, weight_decay, step = c.check_adam_update(
        param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step)
    t = param.dtype.type
    if decoupled:
        param *= t(1 - lr * weight_decay)
        g = grad
    else:
        g = grad + t(weight_decay) * param if weight_decay else grad
    m *= t(beta1)
    m += t(1 - beta1) * g
    v *= t(beta2)
    v += t(1 - beta2) * g * g
    denom = np.sqrt(v) / t(np.sqrt(1 - beta2**step))
    denom += t(eps)
    param -= t(lr / (1 - beta1**step)) * m / denom


def dropout(x, keep, scale):
    """y = x * scale where keep, x * 0 elsewhere."""
    scale = c.check_dropout(x, keep, scale)
    return x * np.where(keep, x.dtype.type(scale), x.dtype.type(0))


def batchnorm_forward(x, gamma, beta, eps):
    """Batch statistics per channel over axes 0 and 2 (in float64), then the affine map."""
    eps = c.check_batchnorm(x, gamma, beta, eps)
    mean = x.mean(axis=(0, 2), dtype=np.float64)
    var = ((x - mean[:, None].astype(x.dtype)) ** 2).mean(axis=(0, 2), dtype=np.float64)
    mean, var = mean.astype(x.dtype), var.astype(x.dtype)
    return batchnorm_inference(x, gamma, beta, mean, var, eps), mean, var


def batchnorm_inference(x, gamma, beta, mean, var, eps):
    """y = x * a + b per channel, a = gamma / sqrt(var + eps), b = beta - mean * a."""
    eps = c.check_batchnorm(x, gamma, beta, eps, (("mean", mean), ("var", var)))
    a = (gamma / np.sqrt(var.astype(np.float64) + eps)).astype(x.dtype)
    b = (beta - mean * a).astype(x.dtype)
    return x * a[:, None] + b[:, None]


def batchnorm_backward(dy, x, gamma, mean, var, eps):
    """dbeta = sum dy, dgamma = sum dy * xhat, dx = gamma * inv_std * (dy - dbeta / M -
    xhat * dgamma / M), per channel."""
    eps = c.check_batchnorm_backward(dy, x, gamma, mean, var, eps)
    m = x.shape[0] * x.shape[2]
    inv_std = (1 / np.sqrt(var.astype(np.float64) + eps)).astype(x.dtype)[:, None]
    xhat = (x - mean[:, None]) * inv_std
    dbeta = dy.sum(axis=(0, 2), dtype=np.float64)
    dgamma = (dy * xhat).sum(axis=(0, 2), dtype=np.float64)
    t = x.dtype.type
    dx = (gamma[:, None] * inv_std) * (dy - t(1 / m) * dbeta.astype(x.dtype)[:, None]
                                       - xhat * (t(1 / m) * dgamma.astype(x.dtype)[:, None]))
    return dx, dgamma.astype(x.dtype), dbeta.astype(x.dtype)
