"""The ``numba`` backend: compiled, multi-threaded CPU kernels.

Each public function validates its input and allocates its outputs (the checks in ``_contract``),
then calls a private ``@njit`` kernel. Parallel kernels split the work with ``prange`` so that
every thread writes its own disjoint slice of the output (an output plane, a filter's weights):
no two threads ever write the same element, so there are no races and no atomics.
The contract (shapes, dtypes, argmax format, tie rule) is in ``_contract.py``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import _contract as c

# NOTE: every jit flag lives here. fastmath allows reassociating sums (so reductions vectorize)
# but not 'nnan'/'ninf': a NaN must still propagate so that a diverging loss is detected.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
_parallel = njit(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)
_serial = njit(cache=True, fastmath=FASTMATH, nogil=True)


def _padded(x, ph, pw=None):
    """x zero-padded by ph rows and pw (default ph) columns on each side, C-contiguous."""
    pw = ph if pw is None else pw
    if ph == 0 and pw == 0:
        return np.ascontiguousarray(x)
    n, ch, h, w = x.shape
    xp = np.zeros((n, ch, h + 2 * ph, w + 2 * pw), x.dtype)
    xp[:, :, ph : ph + h, pw : pw + w] = x
    return xp


def _flat_planes(xp):
    """(N, C, Hp, Wp) -> (N, C, Hp*Wp), a view."""
    return xp.reshape(xp.shape[0], xp.shape[1], -1)


# NOTE on the stride-1 kernels: each padded plane is read as one flat row of Hp*Wp values, and an
# output row i, column j lives at i*Wp + j of a "wide" output of OH rows of Wp values. A tap (p, q)
# then adds w * x_flat[k + p*Wp + q] to wide[k] for every k in one contiguous loop the compiler
# vectorizes; the Wp - OW junk columns of each wide row are computed and thrown away. The tap's
# offset is applied by slicing (xs = x_flat[off:off + L]) so that every index inside the loop is a
# plain non-negative range variable: with a runtime offset inside the index, Numba keeps its
# negative-index wraparound check and the loads turn into gathers.
_FB = 4  # output channels per task: they share every input load (8 spilled registers)


# -- convolution ------------------------------------------------------------------------------


@_parallel
def _conv_forward(xp, w, b, stride, y):
    N, C = xp.shape[0], xp.shape[1]
    F, _, KH, KW = w.shape
    OH, OW = y.shape[2], y.shape[3]
    for t in prange(N * F):  # one output plane per task
        n, f = t // F, t % F
        out = y[n, f]
        out[:, :] = b[f]
        for ch in range(C):
            for p in range(KH):
                for q in range(KW):
                    wv = w[f, ch, p, q]
                    for i in range(OH):
                        row = xp[n, ch, i * stride + p]
                        orow = out[i]
                        for j in range(OW):
                            orow[j] += wv * row[j * stride + q]


@_parallel
def _conv_forward_s1(xf, w, b, wp, y):
    N, C = xf.shape[0], xf.shape[1]
    F, _, KH, KW = w.shape
    OH, OW = y.shape[2], y.shape[3]
    L = (OH - 1) * wp + OW  # the wide output up to its last real cell
    blocks = (F + _FB - 1) // _FB
    for t in prange(N * blocks):  # _FB output planes of one image per task
        n, f0 = t // blocks, (t % blocks) * _FB
        fb = min(_FB, F - f0)
        acc = np.empty((_FB, L), y.dtype)
        for r in range(fb):
            acc[r, :] = b[f0 + r]
        for ch in range(C):
            xc = xf[n, ch]
            for p in range(KH):
                for q in range(KW):
                    xs = xc[p * wp + q : p * wp + q + L]
                    if fb == _FB:
                        w0, w1 = w[f0, ch, p, q], w[f0 + 1, ch, p, q]
                        w2, w3 = w[f0 + 2, ch, p, q], w[f0 + 3, ch, p, q]
                        a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
                        for k in range(L):
                            v = xs[k]
                            a0[k] += w0 * v
                            a1[k] += w1 * v
                            a2[k] += w2 * v
                            a3[k] += w3 * v
                    else:
                        for r in range(fb):
                            wv = w[f0 + r, ch, p, q]
                            a = acc[r]
                            for k in range(L):
                                a[k] += wv * xs[k]
        for r in range(fb):
            for i in range(OH):
                for j in range(OW):
                    y[n, f0 + r, i, j] = acc[r, i * wp + j]


def _forward(x, w, b, stride, ph, pw, shape):
    y = np.empty(shape, x.dtype)
    w = np.ascontiguousarray(w)
    if stride == 1:
        xp = _padded(x, ph, pw)
        _conv_forward_s1(_flat_planes(xp), w, b, xp.shape[3], y)
    else:
        _conv_forward(_padded(x, ph, pw), w, b, stride, y)
    return y


def conv2d_forward(x, w, b, stride, pad):
    """y[n, f, i, j] = b[f] + sum_{c,p,q} w[f, c, p, q] * xpad[n, c, i*stride + p, j*stride + q].

    x (N, C, H, W), w (F, C, KH, KW), b (F,), one float dtype -> y (N, F, OH, OW).
    """
    stride, pad, shape = c.check_conv_forward(x, w, b, stride, pad)
    return _forward(x, w, b, stride, pad, pad, shape)


@_parallel
def _conv_grad_weight(xp, dy, stride, dw, db):
    N, C = xp.shape[0], xp.shape[1]
    F, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    KH, KW = dw.shape[2], dw.shape[3]
    for t in prange(F * C):  # one (filter, channel) slice of dw per task
        f, ch = t // C, t % C
        for p in range(KH):
            for q in range(KW):
                acc = dw[f, ch, p, q]  # zero, in the arrays' dtype
                for n in range(N):
                    for i in range(OH):
                        row = xp[n, ch, i * stride + p]
                        g = dy[n, f, i]
                        for j in range(OW):
                            acc += g[j] * row[j * stride + q]
                dw[f, ch, p, q] = acc
    for f in prange(F):
        acc = db[f]
        for n in range(N):
            for i in range(OH):
                for j in range(OW):
                    acc += dy[n, f, i, j]
        db[f] = acc


@_parallel
def _conv_grad_weight_s1(xf, dyw, wp, L, dw, db):
    N, C = xf.shape[0], xf.shape[1]
    F, _, KH, KW = dw.shape
    for t in prange(F * C):  # one (filter, channel) slice of dw per task
        f, ch = t // C, t % C
        for p in range(KH):
            for q in range(KW):
                acc = dw[f, ch, p, q]  # zero, in the arrays' dtype
                for n in range(N):
                    g = dyw[n, f]
                    xs = xf[n, ch, p * wp + q : p * wp + q + L]
                    for k in range(L):
                        acc += g[k] * xs[k]
                dw[f, ch, p, q] = acc
    for f in prange(F):
        acc = db[f]
        for n in range(N):
            g = dyw[n, f]
            for k in range(L):
                acc += g[k]
        db[f] = acc


def conv2d_grad_weight(x, dy, kernel_size, stride, pad):
    """dw[f, c, p, q] = sum_{n,i,j} dy[n, f, i, j] * xpad[n, c, i*stride + p, j*stride + q];
    db[f] = sum_{n,i,j} dy[n, f, i, j]. Returns (dw (F, C, KH, KW), db (F,))."""
    (kh, kw), stride, pad = c.check_conv_grad_weight(x, dy, kernel_size, stride, pad)
    n, f, oh, ow = dy.shape
    dw = np.zeros((f, x.shape[1], kh, kw), x.dtype)
    db = np.zeros(f, x.dtype)
    xp = _padded(x, pad)
    if stride == 1:
        wp = xp.shape[3]
        # dy in the wide layout, its junk columns zero so they add nothing to the dot products.
        dyw = np.zeros((n, f, oh, wp), dy.dtype)
        dyw[..., :ow] = dy
        _conv_grad_weight_s1(_flat_planes(xp), _flat_planes(dyw), wp, (oh - 1) * wp + ow, dw, db)
    else:
        _conv_grad_weight(xp, np.ascontiguousarray(dy), stride, dw, db)
    return dw, db


@_parallel
def _conv_grad_input(dy, w, stride, dxp):
    N, F, OH, OW = dy.shape
    C, KH, KW = w.shape[1], w.shape[2], w.shape[3]
    for t in prange(N * C):  # one padded input plane per task
        n, ch = t // C, t % C
        plane = dxp[n, ch]
        for f in range(F):
            for p in range(KH):
                for q in range(KW):
                    wv = w[f, ch, p, q]
                    for i in range(OH):
                        g = dy[n, f, i]
                        row = plane[i * stride + p]
                        for j in range(OW):
                            row[j * stride + q] += wv * g[j]


def conv2d_grad_input(dy, w, input_shape, stride, pad):
    """dx = the transpose of the convolution applied to dy: every dy[n, f, i, j] * w[f, c, p, q]
    added at xpad[n, c, i*stride + p, j*stride + q], padding then cropped. dx has input_shape."""
    (n, ch, h, wd), stride, pad = c.check_conv_grad_input(dy, w, input_shape, stride, pad)
    f, _, kh, kw = w.shape
    if stride == 1 and pad < min(kh, kw):
        # With stride 1 the input gradient is itself a convolution: of dy padded by K-1-pad with
        # the kernels flipped and their in/out channels swapped. It runs on the fast kernel.
        w_t = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        zero = np.zeros(ch, dy.dtype)
        return _forward(dy, w_t, zero, 1, kh - 1 - pad, kw - 1 - pad, (n, ch, h, wd))
    dxp = np.zeros((n, ch, h + 2 * pad, wd + 2 * pad), dy.dtype)
    _conv_grad_input(np.ascontiguousarray(dy), np.ascontiguousarray(w), stride, dxp)
    if pad == 0:
        return dxp
    return np.ascontiguousarray(dxp[:, :, pad : pad + h, pad : pad + wd])


# -- max pooling ------------------------------------------------------------------------------


@_parallel
def _pool_forward(x, size, stride, y, argmax):
    N, C, _, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    for t in prange(N * C):  # one plane per task
        n, ch = t // C, t % C
        plane = x[n, ch]
        for i in range(OH):
            for j in range(OW):
                bh, bv = i * stride, j * stride
                best = plane[bh, bv]
                for p in range(size):
                    for q in range(size):
                        v = plane[i * stride + p, j * stride + q]
                        if v > best:  # NOTE: strictly greater: ties keep the first maximum
                            best = v
                            bh, bv = i * stride + p, j * stride + q
                y[n, ch, i, j] = best
                argmax[n, ch, i, j] = bh * W + bv


def maxpool2d_forward(x, size, stride):
    """Max over size x size windows moved by stride: (y (N, C, OH, OW), argmax int64 h*W + w)."""
    size, stride, shape = c.check_pool_forward(x, size, stride)
    y = np.empty(shape, x.dtype)
    argmax = np.empty(shape, np.int64)
    _pool_forward(np.ascontiguousarray(x), size, stride, y, argmax)
    return y, argmax


@_parallel
def _pool_backward(dy, argmax, dx):
    P = dy.shape[0]
    for t in prange(P):  # one plane per task; overlapping windows add up within it
        for k in range(dy.shape[1]):
            dx[t, argmax[t, k]] += dy[t, k]


def maxpool2d_backward(dy, argmax, input_shape, size, stride):
    """dx (input_shape): every dy[n, c, i, j] added at its argmax position in plane (n, c)."""
    (n, ch, h, w), size, stride = c.check_pool_backward(dy, argmax, input_shape, size, stride)
    if argmax.size and (argmax.min() < 0 or argmax.max() >= h * w):
        raise ValueError(f"argmax values must lie in [0, {h * w}) for {h}x{w} planes")
    dx = np.zeros((n * ch, h * w), dy.dtype)
    _pool_backward(np.ascontiguousarray(dy).reshape(n * ch, -1),
                   np.ascontiguousarray(argmax, dtype=np.int64).reshape(n * ch, -1), dx)
    return dx.reshape(n, ch, h, w)


# -- elementwise, dense, loss -----------------------------------------------------------------


@_parallel
def _relu_forward(x, y):
    for i in prange(x.size):
        y[i] = x[i] if x[i] > 0 else 0


@_parallel
def _relu_backward(dy, y, dx):
    for i in prange(dy.size):
        dx[i] = dy[i] if y[i] > 0 else 0


def relu_forward(x):
    """y = max(x, 0), elementwise, any shape."""
    c.check_array("x", x)
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    _relu_forward(x.reshape(-1), y.reshape(-1))
    return y


def relu_backward(dy, y):
    """dx = dy where the forward output y was positive, else 0."""
    c.check_relu_backward(dy, y)
    dy = np.ascontiguousarray(dy)
    dx = np.empty_like(dy)
    _relu_backward(dy.reshape(-1), np.ascontiguousarray(y).reshape(-1), dx.reshape(-1))
    return dx


# NOTE: dense layers are computed here rather than by NumPy's matmul on purpose. OpenBLAS runs its
# own thread pool; with Numba's threads spinning on the same cores between kernels, the two pools
# stalled each other for milliseconds per call (a 4-MFLOP GEMM took 8 ms). One runtime owns the
# cores during training.


@_parallel
def _dense_forward(x, w, b, y):
    N, IN = x.shape
    OUT = w.shape[0]
    for o in prange(OUT):  # one output feature (a column of y) per task
        wo = w[o]
        for n in range(N):
            xn = x[n]
            acc = b[o]
            for k in range(IN):
                acc += xn[k] * wo[k]
            y[n, o] = acc


def dense_forward(x, w, b):
    """y = x w^T + b: x (N, IN), w (OUT, IN), b (OUT,) -> (N, OUT)."""
    c.check_dense_forward(x, w, b)
    y = np.empty((x.shape[0], w.shape[0]), x.dtype)
    _dense_forward(np.ascontiguousarray(x), np.ascontiguousarray(w), b, y)
    return y


@_parallel
def _dense_backward(dy, x, w, dx, dw, db):
    N, IN = x.shape
    OUT = w.shape[0]
    for o in prange(OUT):  # dw row o and db[o] per task
        row = dw[o]
        acc = db[o]
        for n in range(N):
            g = dy[n, o]
            acc += g
            xn = x[n]
            for k in range(IN):
                row[k] += g * xn[k]
        db[o] = acc
    for n in prange(N):  # dx row n per task
        out = dx[n]
        for o in range(OUT):
            g = dy[n, o]
            wo = w[o]
            for k in range(IN):
                out[k] += g * wo[k]


def dense_backward(dy, x, w):
    """(dx = dy w (N, IN), dw = dy^T x (OUT, IN), db = sum_n dy (OUT,))."""
    c.check_dense_backward(dy, x, w)
    dx = np.zeros(x.shape, dy.dtype)
    dw = np.zeros(w.shape, dy.dtype)
    db = np.zeros(w.shape[0], dy.dtype)
    _dense_backward(np.ascontiguousarray(dy), np.ascontiguousarray(x), np.ascontiguousarray(w),
                    dx, dw, db)
    return dx, dw, db


@_serial
def _softmax_cross_entropy(logits, labels, dlogits):
    N, K = logits.shape
    loss = 0.0
    for n in range(N):
        top = logits[n, 0]
        for k in range(1, K):
            top = max(top, logits[n, k])
        total = 0.0
        for k in range(K):
            e = np.exp(logits[n, k] - top)  # NOTE: shifted by the max, so exp cannot overflow
            dlogits[n, k] = e
            total += e
        loss += np.log(total) + top - logits[n, labels[n]]
        for k in range(K):
            dlogits[n, k] = dlogits[n, k] / total / N
        dlogits[n, labels[n]] -= 1.0 / N
    return loss / N


def softmax_cross_entropy(logits, labels):
    """(mean cross-entropy of softmax(logits) against labels, its gradient (N, K))."""
    c.check_softmax_cross_entropy(logits, labels)
    dlogits = np.empty_like(logits)
    loss = _softmax_cross_entropy(np.ascontiguousarray(logits),
                                  np.ascontiguousarray(labels, dtype=np.int64), dlogits)
    return float(loss), dlogits
