"""Straightforward loop versions of the kernel math, written for the tests to compare against.

Deliberately independent of every backend: loops over output cells, a small NumPy sum per window.
It is the second oracle beside ``kernels/naive.py``: a mistake in ``naive`` would otherwise pass
every comparison (see tests/README.md).
"""

import numpy as np


def pad(x, p):
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))


def conv2d(x, w, b, stride, p):
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    xp = pad(x, p)
    oh, ow = (h + 2 * p - kh) // stride + 1, (wd + 2 * p - kw) // stride + 1
    y = np.zeros((n, f, oh, ow), x.dtype)
    for i in range(n):
        for o in range(f):
            for r in range(oh):
                for s in range(ow):
                    win = xp[i, :, r * stride : r * stride + kh, s * stride : s * stride + kw]
                    y[i, o, r, s] = np.sum(win * w[o]) + b[o]
    return y


def conv2d_grads(x, w, dy, stride, p):
    """(dx, dw, db) of sum(conv2d(x, w, b) * dy)."""
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    xp = pad(x, p)
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i in range(n):
        for o in range(f):
            for r in range(dy.shape[2]):
                for s in range(dy.shape[3]):
                    rows = slice(r * stride, r * stride + kh)
                    cols = slice(s * stride, s * stride + kw)
                    dw[o] += dy[i, o, r, s] * xp[i, :, rows, cols]
                    dxp[i, :, rows, cols] += dy[i, o, r, s] * w[o]
    return dxp[:, :, p : p + h, p : p + wd], dw, dy.sum(axis=(0, 2, 3))


def maxpool2d(x, size, stride):
    """(y, argmax as flat h*W + w, first maximum in row-major window order wins)."""
    n, c, h, w = x.shape
    oh, ow = (h - size) // stride + 1, (w - size) // stride + 1
    y = np.zeros((n, c, oh, ow), x.dtype)
    arg = np.zeros((n, c, oh, ow), np.int64)
    for i in range(n):
        for ch in range(c):
            for r in range(oh):
                for s in range(ow):
                    best = None
                    for p in range(size):
                        for q in range(size):
                            v = x[i, ch, r * stride + p, s * stride + q]
                            if best is None or v > best:
                                best = v
                                arg[i, ch, r, s] = (r * stride + p) * w + s * stride + q
                    y[i, ch, r, s] = best
    return y, arg


def maxpool2d_backward(dy, arg, shape):
    dx = np.zeros(shape, dy.dtype)
    n, c, h, w = shape
    for i in range(n):
        for ch in range(c):
            for r in range(dy.shape[2]):
                for s in range(dy.shape[3]):
                    a = arg[i, ch, r, s]
                    dx[i, ch, a // w, a % w] += dy[i, ch, r, s]
    return dx


def avgpool2d(x, size, stride):
    """Each window's mean (float64 sums: a reference independent of the backends' order)."""
    n, c, h, w = x.shape
    oh, ow = (h - size) // stride + 1, (w - size) // stride + 1
    y = np.zeros((n, c, oh, ow))
    for r in range(oh):
        for s in range(ow):
            window = x[:, :, r * stride : r * stride + size, s * stride : s * stride + size]
            y[:, :, r, s] = window.astype(np.float64).mean(axis=(2, 3))
    return y.astype(x.dtype)


def avgpool2d_backward(dy, shape, size, stride):
    dx = np.zeros(shape)
    for r in range(dy.shape[2]):
        for s in range(dy.shape[3]):
            dx[:, :, r * stride : r * stride + size, s * stride : s * stride + size] += (
                dy[:, :, r, s, None, None] / (size * size))
    return dx.astype(dy.dtype)


def softmax_cross_entropy(logits, labels):
    n = len(labels)
    loss = 0.0
    grad = np.zeros_like(logits)
    for i in range(n):
        z = logits[i].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        loss -= np.log(p[labels[i]])
        grad[i] = p
        grad[i, labels[i]] -= 1
    return loss / n, grad / n


def tol(dtype):
    """assert_allclose tolerances for comparing two implementations in ``dtype``."""
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-12}


def numeric_grad(f, a, eps=1e-6):
    """Central finite differences of the scalar f() with respect to every element of a."""
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + eps
        fp = f()
        a[idx] = old - eps
        fm = f()
        a[idx] = old
        g[idx] = (fp - fm) / (2 * eps)
    return g
