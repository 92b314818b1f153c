"""The ``naive`` backend: the specification, in plain Python loops.

One loop nest per kernel, following the formula in its docstring index by index. NumPy is used
only to allocate and index arrays; nothing here is vectorized, so this is slow on purpose (a
training step of the simple model at batch 10 takes about a second). Every other backend is
tested against these functions, and these against finite differences.
The contract (shapes, dtypes, argmax format, tie rule) is in ``_contract.py``.
"""

from __future__ import annotations

import math

import numpy as np

from . import _contract as c

# The optional kernel groups of the contract that this backend has (_contract.OPTIONAL_KERNELS).
OPTIONAL = frozenset()


def conv2d_forward(x, w, b, stride, pad):
    """y[n, f, i, j] = b[f] + sum_{c, p, q} w[f, c, p, q] * x[n, c, i*stride + p - pad,
    j*stride + q - pad], where x is zero outside its H x W plane."""
    stride, pad, (N, F, OH, OW) = c.check_conv_forward(x, w, b, stride, pad)
    _, C, H, W = x.shape
    _, _, KH, KW = w.shape
    y = np.zeros((N, F, OH, OW), x.dtype)
    for n in range(N):
        for f in range(F):
            for i in range(OH):
                for j in range(OW):
                    total = b[f]
                    for ch in range(C):
                        for p in range(KH):
                            for q in range(KW):
                                h = i * stride + p - pad
                                v = j * stride + q - pad
                                if 0 <= h < H and 0 <= v < W:
                                    total += w[f, ch, p, q] * x[n, ch, h, v]
                    y[n, f, i, j] = total
    return y


def conv2d_grad_weight(x, dy, kernel_size, stride, pad):
    """dw[f, c, p, q] = sum_{n, i, j} dy[n, f, i, j] * x[n, c, i*stride + p - pad,
    j*stride + q - pad];  db[f] = sum_{n, i, j} dy[n, f, i, j]."""
    (KH, KW), stride, pad = c.check_conv_grad_weight(x, dy, kernel_size, stride, pad)
    N, C, H, W = x.shape
    _, F, OH, OW = dy.shape
    dw = np.zeros((F, C, KH, KW), x.dtype)
    db = np.zeros(F, x.dtype)
    for f in range(F):
        for n in range(N):
            for i in range(OH):
                for j in range(OW):
                    db[f] += dy[n, f, i, j]
        for ch in range(C):
            for p in range(KH):
                for q in range(KW):
                    total = 0.0
                    for n in range(N):
                        for i in range(OH):
                            for j in range(OW):
                                h = i * stride + p - pad
                                v = j * stride + q - pad
                                if 0 <= h < H and 0 <= v < W:
                                    total += dy[n, f, i, j] * x[n, ch, h, v]
                    dw[f, ch, p, q] = total
    return dw, db


def conv2d_grad_input(dy, w, input_shape, stride, pad):
    """dx[n, c, h, v] = sum over f and over the taps (p, q) with h = i*stride + p - pad and
    v = j*stride + q - pad for some output cell (i, j) of w[f, c, p, q] * dy[n, f, i, j]."""
    (N, C, H, W), stride, pad = c.check_conv_grad_input(dy, w, input_shape, stride, pad)
    F, _, KH, KW = w.shape
    OH, OW = dy.shape[2:]
    dx = np.zeros((N, C, H, W), dy.dtype)
    for n in range(N):
        for f in range(F):
            for i in range(OH):
                for j in range(OW):
                    for ch in range(C):
                        for p in range(KH):
                            for q in range(KW):
                                h = i * stride + p - pad
                                v = j * stride + q - pad
                                if 0 <= h < H and 0 <= v < W:
                                    dx[n, ch, h, v] += w[f, ch, p, q] * dy[n, f, i, j]
    return dx


def _beats(value, best):
    """Whether a window cell replaces the best one so far: strictly greater, so a tie keeps the
    earlier cell; and a NaN counts as larger than every number, so the first NaN wins."""
    return value > best or (math.isnan(value) and not math.isnan(best))


def maxpool2d_forward(x, size, stride, with_argmax=True):
    """y[n, c, i, j] = max_{p, q < size} x[n, c, i*stride + p, j*stride + q];
    argmax[n, c, i, j] = h * W + v of that maximum, the first one in row-major window order
    (a NaN is the maximum of any window that holds one); None unless with_argmax."""
    size, stride, (N, C, OH, OW) = c.check_pool_forward(x, size, stride)
    W = x.shape[3]
    y = np.zeros((N, C, OH, OW), x.dtype)
    argmax = np.zeros((N, C, OH, OW), np.int64)
    for n in range(N):
        for ch in range(C):
            for i in range(OH):
                for j in range(OW):
                    best_h, best_v = i * stride, j * stride
                    for p in range(size):
                        for q in range(size):
                            h, v = i * stride + p, j * stride + q
                            if _beats(x[n, ch, h, v], x[n, ch, best_h, best_v]):
                                best_h, best_v = h, v
                    y[n, ch, i, j] = x[n, ch, best_h, best_v]
                    argmax[n, ch, i, j] = best_h * W + best_v
    return y, (argmax if with_argmax else None)


def maxpool2d_backward(dy, argmax, input_shape, size, stride):
    """dx[n, c, h, v] = sum of dy[n, c, i, j] over the output cells whose argmax is h*W + v."""
    (N, C, H, W), size, stride = c.check_pool_backward(dy, argmax, input_shape, size, stride)
    OH, OW = dy.shape[2:]
    c.check_argmax_range(argmax, H, W)
    dx = np.zeros((N, C, H, W), dy.dtype)
    for n in range(N):
        for ch in range(C):
            for i in range(OH):
                for j in range(OW):
                    k = argmax[n, ch, i, j]
                    dx[n, ch, k // W, k % W] += dy[n, ch, i, j]
    return dx


def avgpool2d_forward(x, size, stride):
    """y[n, c, i, j] = (sum_{p, q < size} x[n, c, i*stride + p, j*stride + q]) / size^2, the
    window summed in row-major order."""
    size, stride, (N, C, OH, OW) = c.check_pool_forward(x, size, stride)
    y = np.zeros((N, C, OH, OW), x.dtype)
    for n in range(N):
        for ch in range(C):
            for i in range(OH):
                for j in range(OW):
                    total = x.dtype.type(0)
                    for p in range(size):
                        for q in range(size):
                            total += x[n, ch, i * stride + p, j * stride + q]
                    y[n, ch, i, j] = total / (size * size)
    return y


def avgpool2d_backward(dy, input_shape, size, stride):
    """dx[n, c, h, v] = sum of dy[n, c, i, j] / size^2 over the windows (i, j) holding (h, v)."""
    (N, C, H, W), size, stride = c.check_avgpool_backward(dy, input_shape, size, stride)
    OH, OW = dy.shape[2:]
    dx = np.zeros((N, C, H, W), dy.dtype)
    for n in range(N):
        for ch in range(C):
            for i in range(OH):
                for j in range(OW):
                    share = dy[n, ch, i, j] / (size * size)
                    for p in range(size):
                        for q in range(size):
                            dx[n, ch, i * stride + p, j * stride + q] += share
    return dx


def global_avgpool_forward(x):
    """y[n, c] = (sum_{h, v} x[n, c, h, v]) / (H * W), in row-major order: (N, C, H, W) ->
    (N, C)."""
    c.check_array("x", x, 4)
    N, C, H, W = x.shape
    y = np.zeros((N, C), x.dtype)
    for n in range(N):
        for ch in range(C):
            total = x.dtype.type(0)
            for h in range(H):
                for v in range(W):
                    total += x[n, ch, h, v]
            y[n, ch] = total / (H * W)
    return y


def global_avgpool_backward(dy, input_shape):
    """dx[n, c, h, v] = dy[n, c] / (H * W) at every (h, v) of the plane."""
    N, C, H, W = c.check_global_avgpool_backward(dy, input_shape)
    dx = np.zeros((N, C, H, W), dy.dtype)
    for n in range(N):
        for ch in range(C):
            share = dy[n, ch] / (H * W)
            for h in range(H):
                for v in range(W):
                    dx[n, ch, h, v] = share
    return dx


def add(a, b):
    """a + b, elementwise: the residual connection (and, backward, two branches' gradients)."""
    c.check_add(a, b)
    out = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        out[idx] = a[idx] + b[idx]
    return out


def relu_forward(x):
    """y = 0 where x <= 0, else x (so a NaN passes through)."""
    c.check_array("x", x)
    y = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        y[idx] = 0 if x[idx] <= 0 else x[idx]
    return y


def relu_backward(dy, y):
    """dx = dy * 0 where the forward output y <= 0, else dy."""
    c.check_relu_backward(dy, y)
    dx = np.zeros_like(dy)
    for idx in np.ndindex(dy.shape):
        # NOTE: dy * 0, not 0: a NaN or infinite dy gives NaN (IEEE 754), it is not made a number
        dx[idx] = dy[idx] * 0 if y[idx] <= 0 else dy[idx]
    return dx


def dense_forward(x, w, b):
    """y[n, o] = b[o] + sum_k x[n, k] * w[o, k]."""
    c.check_dense_forward(x, w, b)
    N, IN = x.shape
    OUT = w.shape[0]
    y = np.zeros((N, OUT), x.dtype)
    for n in range(N):
        for o in range(OUT):
            total = b[o]
            for k in range(IN):
                total += x[n, k] * w[o, k]
            y[n, o] = total
    return y


def dense_backward(dy, x, w):
    """dx[n, k] = sum_o dy[n, o] w[o, k];  dw[o, k] = sum_n dy[n, o] x[n, k];
    db[o] = sum_n dy[n, o]."""
    c.check_dense_backward(dy, x, w)
    N, IN = x.shape
    OUT = w.shape[0]
    dx = np.zeros((N, IN), dy.dtype)
    dw = np.zeros((OUT, IN), dy.dtype)
    db = np.zeros(OUT, dy.dtype)
    for n in range(N):
        for o in range(OUT):
            db[o] += dy[n, o]
            for k in range(IN):
                dx[n, k] += dy[n, o] * w[o, k]
                dw[o, k] += dy[n, o] * x[n, k]
    return dx, dw, db


def softmax_cross_entropy(logits, labels):
    """p[n] = softmax(logits[n]); loss = -(1/N) sum_n log p[n, labels[n]];
    dlogits[n, k] = (p[n, k] - [k == labels[n]]) / N."""
    c.check_softmax_cross_entropy(logits, labels)
    N, K = logits.shape
    dlogits = np.zeros((N, K), logits.dtype)
    loss = 0.0
    for n in range(N):
        # NOTE: subtract the row's max so that exp cannot overflow.
        top = max(float(logits[n, k]) for k in range(K))
        total = 0.0
        for k in range(K):
            total += math.exp(float(logits[n, k]) - top)
        loss += math.log(total) + top - float(logits[n, labels[n]])
        for k in range(K):
            p = math.exp(float(logits[n, k]) - top) / total
            dlogits[n, k] = (p - (1.0 if k == labels[n] else 0.0)) / N
    return loss / N, dlogits


def sgd_update(param, grad, lr):
    """param[i] -= lr * grad[i] for every index i, in place."""
    c.check_sgd_update(param, grad, lr)
    for idx in np.ndindex(param.shape):
        param[idx] -= lr * grad[idx]


def sgd_momentum_update(param, grad, velocity, lr, momentum, weight_decay, nesterov):
    """For every index i (torch.optim.SGD with dampening 0):
    g = grad[i] + weight_decay * param[i];  velocity[i] = momentum * velocity[i] + g;
    param[i] -= lr * (g + momentum * velocity[i] if nesterov else velocity[i])."""
    lr, momentum, weight_decay = c.check_sgd_momentum_update(param, grad, velocity, lr, momentum,
                                                             weight_decay)
    for idx in np.ndindex(param.shape):
        g = grad[idx] + weight_decay * param[idx]
        velocity[idx] = momentum * velocity[idx] + g
        step = g + momentum * velocity[idx] if nesterov else velocity[idx]
        param[idx] -= lr * step


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step):
    """For every index i, at step t = step (torch.optim.Adam; AdamW when decoupled):
    decoupled: param[i] *= 1 - lr * weight_decay, g = grad[i];
    else:      g = grad[i] + weight_decay * param[i];
    m[i] = beta1 * m[i] + (1 - beta1) * g;   v[i] = beta2 * v[i] + (1 - beta2) * g * g;
    param[i] -= lr / (1 - beta1**t) * m[i] / (sqrt(v[i]) / sqrt(1 - beta2**t) + eps)."""
    lr, beta1, beta2, eps, weight_decay, t = c.check_adam_update(param, grad, m, v, lr, beta1,
                                                                 beta2, eps, weight_decay, step)
    for idx in np.ndindex(param.shape):
        if decoupled:
            param[idx] *= 1 - lr * weight_decay
            g = grad[idx]
        else:
            g = grad[idx] + weight_decay * param[idx]
        m[idx] = beta1 * m[idx] + (1 - beta1) * g
        v[idx] = beta2 * v[idx] + (1 - beta2) * g * g
        denom = math.sqrt(v[idx]) / math.sqrt(1 - beta2**t) + eps
        param[idx] -= lr / (1 - beta1**t) * m[idx] / denom


def dropout(x, keep, scale):
    """y[i] = x[i] * scale where keep[i], else x[i] * 0 (so a NaN stays NaN)."""
    scale = c.check_dropout(x, keep, scale)
    y = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        y[idx] = x[idx] * scale if keep[idx] else x[idx] * 0
    return y


def batchnorm_forward(x, gamma, beta, eps):
    """Per channel ch, over every n and k (M = N * L values):
    mean[ch] = sum x[n, ch, k] / M;  var[ch] = sum (x[n, ch, k] - mean[ch])**2 / M;
    y[n, ch, k] = (x[n, ch, k] - mean[ch]) / sqrt(var[ch] + eps) * gamma[ch] + beta[ch]."""
    eps = c.check_batchnorm(x, gamma, beta, eps)
    N, C, L = x.shape
    mean = np.zeros(C, x.dtype)
    var = np.zeros(C, x.dtype)
    for ch in range(C):
        total = 0.0
        for n in range(N):
            for k in range(L):
                total += float(x[n, ch, k])
        mean[ch] = total / (N * L)
        total = 0.0
        for n in range(N):
            for k in range(L):
                total += (float(x[n, ch, k]) - float(mean[ch])) ** 2
        var[ch] = total / (N * L)
    return batchnorm_inference(x, gamma, beta, mean, var, eps), mean, var


def batchnorm_inference(x, gamma, beta, mean, var, eps):
    """y[n, ch, k] = (x[n, ch, k] - mean[ch]) / sqrt(var[ch] + eps) * gamma[ch] + beta[ch]."""
    eps = c.check_batchnorm(x, gamma, beta, eps, (("mean", mean), ("var", var)))
    N, C, L = x.shape
    y = np.zeros_like(x)
    for ch in range(C):
        inv_std = 1 / math.sqrt(float(var[ch]) + eps)
        for n in range(N):
            for k in range(L):
                y[n, ch, k] = (float(x[n, ch, k]) - float(mean[ch])) * inv_std * gamma[ch] \
                    + beta[ch]
    return y


def batchnorm_backward(dy, x, gamma, mean, var, eps):
    """With M = N * L and xhat = (x - mean) / sqrt(var + eps), per channel ch:
    dbeta[ch] = sum dy[n, ch, k];  dgamma[ch] = sum dy[n, ch, k] * xhat[n, ch, k];
    dx[n, ch, k] = gamma[ch] / sqrt(var[ch] + eps)
                   * (dy[n, ch, k] - dbeta[ch] / M - xhat[n, ch, k] * dgamma[ch] / M)."""
    eps = c.check_batchnorm_backward(dy, x, gamma, mean, var, eps)
    N, C, L = x.shape
    M = N * L
    dx = np.zeros_like(x)
    dgamma = np.zeros(C, x.dtype)
    dbeta = np.zeros(C, x.dtype)
    for ch in range(C):
        inv_std = 1 / math.sqrt(float(var[ch]) + eps)
        sum_dy = sum_dy_xhat = 0.0
        for n in range(N):
            for k in range(L):
                xhat = (float(x[n, ch, k]) - float(mean[ch])) * inv_std
                sum_dy += float(dy[n, ch, k])
                sum_dy_xhat += float(dy[n, ch, k]) * xhat
        dbeta[ch], dgamma[ch] = sum_dy, sum_dy_xhat
        for n in range(N):
            for k in range(L):
                xhat = (float(x[n, ch, k]) - float(mean[ch])) * inv_std
                dx[n, ch, k] = float(gamma[ch]) * inv_std * (
                    float(dy[n, ch, k]) - sum_dy / M - xhat * sum_dy_xhat / M)
    return dx, dgamma, dbeta
