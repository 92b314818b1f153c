"""The kernel contract every backend implements, and the checks its public wrappers share.

Every backend module (``naive``, ``vectorized``, ``numba_jit``) exposes exactly the functions in
``KERNELS`` with the signatures in ``SIGNATURES``, and the optional groups of ``OPTIONAL_KERNELS``
that its ``OPTIONAL`` names. Arrays are NumPy, NCHW, C-contiguous, float32 or float64
(one dtype per call); ``stride`` and ``pad`` are non-negative ints (padding is symmetric, zeros).

Shapes, with ``OH = (H + 2*pad - KH) // stride + 1`` for convolution and
``OH = (H - size) // stride + 1`` for pooling:

- ``conv2d_forward(x, w, b, stride, pad) -> y``: x (N, C, H, W), w (F, C, KH, KW), b (F,),
  y (N, F, OH, OW).
- ``conv2d_grad_weight(x, dy, kernel_size, stride, pad) -> (dw, db)``: dw (F, C, KH, KW), db (F,).
- ``conv2d_grad_input(dy, w, input_shape, stride, pad) -> dx``: dx has ``input_shape``.
- ``maxpool2d_forward(x, size, stride) -> (y, argmax)``: argmax (N, C, OH, OW) int64 holds, per
  output cell, the flat index ``h * W + w`` in its input plane of the maximum. Ties go to the
  first maximum in row-major window order. ``maxpool2d_forward(x, size, stride,
  with_argmax=False) -> (y, None)``: the same y without the argmax (inference: nothing to
  backpropagate, and argmax, int64, is twice y's bytes in float32).
- ``maxpool2d_backward(dy, argmax, input_shape, size, stride) -> dx``: dy scattered to the
  argmax positions; overlapping windows accumulate.
- ``relu_forward(x) -> y`` and ``relu_backward(dy, y) -> dx`` (y is the forward output).
- ``dense_forward(x, w, b) -> y``: x (N, IN), w (OUT, IN), b (OUT,), y (N, OUT).
- ``dense_backward(dy, x, w) -> (dx, dw, db)``.
- ``softmax_cross_entropy(logits, labels) -> (loss, dlogits)``: logits (N, K) with N >= 1,
  labels (N,) ints in [0, K); loss is the mean over the batch, dlogits its gradient.
- ``sgd_update(param, grad, lr) -> None``: param -= lr * grad, in place (the seed's optimizer).
- ``sgd_momentum_update(param, grad, velocity, lr, momentum, weight_decay, nesterov) -> None``:
  torch.optim.SGD's step (dampening 0), in place on param and velocity:
  ``g = grad + weight_decay * param; velocity = momentum * velocity + g;
  param -= lr * (g + momentum * velocity if nesterov else velocity)``.
- ``adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step) ->
  None``: torch.optim.Adam's step (AdamW's with ``decoupled``), ``step`` >= 1 counting this one,
  in place on param, m and v:
  ``if decoupled: param *= 1 - lr * weight_decay; else: g = grad + weight_decay * param;
  m = beta1 * m + (1 - beta1) * g; v = beta2 * v + (1 - beta2) * g * g;
  param -= lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)``.
- ``dropout(x, keep, scale) -> y``: ``y = x * scale`` where ``keep`` (a bool array shaped like
  x) is true, ``x * 0`` elsewhere; inverted dropout's forward pass and, on dy, its backward pass
  (the mask is drawn by the layer's own generator, so every backend gets the same one).
- ``batchnorm_forward(x, gamma, beta, eps) -> (y, mean, var)``: x (N, C, L), statistics per
  channel over N and L (``var`` biased): ``y = (x - mean) / sqrt(var + eps) * gamma + beta``.
- ``batchnorm_inference(x, gamma, beta, mean, var, eps) -> y``: the same with given statistics.
- ``batchnorm_backward(dy, x, gamma, mean, var, eps) -> (dx, dgamma, dbeta)``: the gradients of
  batchnorm_forward (through the batch statistics), with M = N * L and
  ``xhat = (x - mean) / sqrt(var + eps)``: ``dbeta = sum dy``, ``dgamma = sum dy * xhat``,
  ``dx = gamma / sqrt(var + eps) * (dy - dbeta / M - xhat * dgamma / M)``.

Non-finite values (the NaN rule, as in PyTorch): no kernel turns a NaN or an infinity into a
number. Every output element whose formula reads a NaN is NaN, and infinities follow IEEE 754
(``inf - inf`` and ``inf * 0`` are NaN). In particular:

- ``relu_forward`` passes NaN through (``y = 0 if x <= 0 else x``);
- ``relu_backward`` gives ``dy`` where ``y > 0`` or ``y`` is NaN, and ``dy * 0`` elsewhere: 0,
  but NaN where ``dy`` is NaN or infinite (an undefined product is not made a number);
- a pooling window that holds a NaN has NaN as its maximum, and ``argmax`` points at the window's
  first NaN in row-major order (a NaN counts as larger than every number);
- ``softmax_cross_entropy`` gives a NaN loss, and a NaN row of ``dlogits``, for a row of logits
  holding a NaN or ``+inf``.

A fast backend may give NaN in more places than the formula says, where it multiplies a NaN or
an infinity by a zero that the formula never reads (a padding zero, a junk cell of its layout),
but it never gives a number where the reference gives NaN or an infinity. The conformance tests
check exactly that, on every backend.
"""

from __future__ import annotations

import numpy as np

# Every kernel every backend has, with its signature (a test compares each backend's).
SIGNATURES = {
    "conv2d_forward": "(x, w, b, stride, pad)",
    "conv2d_grad_weight": "(x, dy, kernel_size, stride, pad)",
    "conv2d_grad_input": "(dy, w, input_shape, stride, pad)",
    "maxpool2d_forward": "(x, size, stride, with_argmax=True)",
    "maxpool2d_backward": "(dy, argmax, input_shape, size, stride)",
    "avgpool2d_forward": "(x, size, stride)",
    "avgpool2d_backward": "(dy, input_shape, size, stride)",
    "global_avgpool_forward": "(x)",
    "global_avgpool_backward": "(dy, input_shape)",
    "add": "(a, b)",
    "relu_forward": "(x)",
    "relu_backward": "(dy, y)",
    "dense_forward": "(x, w, b)",
    "dense_backward": "(dy, x, w)",
    "softmax_cross_entropy": "(logits, labels)",
    "sgd_update": "(param, grad, lr)",
    "sgd_momentum_update": "(param, grad, velocity, lr, momentum, weight_decay, nesterov)",
    "adam_update": "(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step)",
    "dropout": "(x, keep, scale)",
    "batchnorm_forward": "(x, gamma, beta, eps)",
    "batchnorm_inference": "(x, gamma, beta, mean, var, eps)",
    "batchnorm_backward": "(dy, x, gamma, mean, var, eps)",
}
KERNELS = tuple(SIGNATURES)

# Optional kernels, in groups that a backend has all of or none of; it says which groups it
# has in its module-level ``OPTIONAL`` (a set of group names), and layers ask ``has`` before
# calling them. Each group computes exactly what required kernels compute (bit for bit on the
# same backend), faster; the conformance tests check that.
OPTIONAL_KERNELS = {
    # x laid out once per convolution layer and step: conv2d_forward's y, plus what its
    # forward kept for the backward ("saved", opaque); conv2d_backward gives (dw, db, dx or
    # None) = conv2d_grad_weight's and conv2d_grad_input's, from one layout of dy.
    "conv2d_saved_layout": {
        "conv2d_forward_saving": "(x, w, b, stride, pad)",
        "conv2d_backward": "(x, dy, w, stride, pad, need_dx=True, saved=None)",
    },
    # A convolution and the ReLU right after it: conv2d_relu_forward gives (relu_forward of
    # conv2d_forward's y, saved as conv2d_forward_saving's); conv2d_relu_backward(x, dy, y, ...)
    # gives conv2d_backward's (dw, db, dx) for the gradient relu_backward(dy, y). One pass over
    # the activations fewer each way (the ReLU at the convolution's store and dy's layout).
    "conv2d_relu": {
        "conv2d_relu_forward": "(x, w, b, stride, pad)",
        "conv2d_relu_backward": "(x, dy, y, w, stride, pad, need_dx=True, saved=None)",
    },
}


def has(module, group):
    """Whether backend ``module`` declares the optional kernel group ``group``."""
    if group not in OPTIONAL_KERNELS:
        raise ValueError(f"Unknown optional kernel group {group!r}. Expected one of "
                         f"{tuple(OPTIONAL_KERNELS)}.")
    return group in module.OPTIONAL


FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_array(name, a, ndim=None, dtype=None):
    """Check that ``a`` is a float32/float64 ndarray with ``ndim`` dims and ``dtype`` if given."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype} but the other inputs are {dtype}")


def check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def pair(name, value):
    """``k`` or ``(kh, kw)`` -> ``(kh, kw)``, both positive ints."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair, got {value!r}")
        return check_int(name, value[0], 1), check_int(name, value[1], 1)
    k = check_int(name, value, 1)
    return k, k


def check_shape4(name, shape):
    if len(shape) != 4:
        raise ValueError(f"{name} must be (N, C, H, W), got {tuple(shape)}")
    return tuple(check_int(name, s, 1) for s in shape)


# The most values one array of a kernel call may hold (8 GiB of float32): a padding or a shape
# past it is a mistake, refused before anything is allocated.
MAX_VALUES = 1 << 31


def conv_output_size(h, w, kh, kw, stride, pad):
    """Output (OH, OW) of a convolution; a window that does not fit is a ValueError."""
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (w + 2 * pad - kw) // stride + 1
    if h + 2 * pad < kh or w + 2 * pad < kw:
        raise ValueError(
            f"kernel {kh}x{kw} does not fit input {h}x{w} with padding {pad}"
        )
    return oh, ow


def check_conv_size(n, c, h, w, f, oh, ow, pad):
    """The padded input (N, C, H + 2 pad, W + 2 pad) and the output (N, F, OH, OW) within
    MAX_VALUES; else a ValueError naming the padding and the shapes."""
    for what, shape in (("the padded input", (n, c, h + 2 * pad, w + 2 * pad)),
                        ("the output", (n, f, oh, ow))):
        values = n * int(np.prod(shape[1:], dtype=object))
        if values > MAX_VALUES:
            raise ValueError(f"{what} would be {shape}: {values:,} values, more than a kernel "
                             f"call takes ({MAX_VALUES:,}); check the padding ({pad}) and the "
                             "shapes")


def pool_output_size(h, w, size, stride):
    if h < size or w < size:
        raise ValueError(f"pool window {size}x{size} does not fit input {h}x{w}")
    return (h - size) // stride + 1, (w - size) // stride + 1


def check_conv_forward(x, w, b, stride, pad):
    check_array("x", x, 4)
    check_array("w", w, 4, x.dtype)
    check_array("b", b, 1, x.dtype)
    n, c, h, wd = x.shape
    f, wc, kh, kw = w.shape
    if wc != c:
        raise ValueError(f"w has {wc} input channels but x has {c}: x {x.shape}, w {w.shape}")
    if b.shape != (f,):
        raise ValueError(f"b must have shape ({f},) to match w {w.shape}, got {b.shape}")
    stride = check_int("stride", stride, 1)
    pad = check_int("pad", pad, 0)
    oh, ow = conv_output_size(h, wd, kh, kw, stride, pad)
    check_conv_size(n, c, h, wd, f, oh, ow, pad)
    return stride, pad, (n, f, oh, ow)


def check_conv_grad_weight(x, dy, kernel_size, stride, pad):
    check_array("x", x, 4)
    check_array("dy", dy, 4, x.dtype)
    kh, kw = pair("kernel_size", kernel_size)
    stride = check_int("stride", stride, 1)
    pad = check_int("pad", pad, 0)
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, w, kh, kw, stride, pad)
    check_conv_size(n, c, h, w, dy.shape[1], oh, ow, pad)
    if dy.shape[0] != n or dy.shape[2:] != (oh, ow):
        raise ValueError(
            f"dy has shape {dy.shape} but x {x.shape} with a {kh}x{kw} kernel, stride {stride}, "
            f"pad {pad} gives (N={n}, F, {oh}, {ow})"
        )
    return (kh, kw), stride, pad


def check_conv_grad_input(dy, w, input_shape, stride, pad):
    check_array("dy", dy, 4)
    check_array("w", w, 4, dy.dtype)
    input_shape = check_shape4("input_shape", input_shape)
    stride = check_int("stride", stride, 1)
    pad = check_int("pad", pad, 0)
    n, c, h, wd = input_shape
    f, wc, kh, kw = w.shape
    if wc != c:
        raise ValueError(f"w {w.shape} does not match input_shape {input_shape} channels")
    oh, ow = conv_output_size(h, wd, kh, kw, stride, pad)
    check_conv_size(n, c, h, wd, f, oh, ow, pad)
    if dy.shape != (n, f, oh, ow):
        raise ValueError(f"dy must have shape {(n, f, oh, ow)}, got {dy.shape}")
    return input_shape, stride, pad


def check_pool_forward(x, size, stride):
    check_array("x", x, 4)
    size = check_int("size", size, 1)
    stride = check_int("stride", stride, 1)
    n, c, h, w = x.shape
    oh, ow = pool_output_size(h, w, size, stride)
    return size, stride, (n, c, oh, ow)


def check_pool_backward(dy, argmax, input_shape, size, stride):
    input_shape, size, stride = check_avgpool_backward(dy, input_shape, size, stride)
    if not isinstance(argmax, np.ndarray) or argmax.shape != dy.shape:
        got = getattr(argmax, "shape", type(argmax).__name__)
        raise ValueError(f"argmax must be an array shaped like dy {dy.shape}, got {got}")
    if argmax.dtype.kind not in "iu":
        raise TypeError(f"argmax must hold integers, got {argmax.dtype}")
    return input_shape, size, stride


def check_avgpool_backward(dy, input_shape, size, stride):
    """dy of a pooling of input_shape (N, C, H, W) by size and stride; (input_shape, size,
    stride) checked. Max pooling's check adds its argmax to it."""
    check_array("dy", dy, 4)
    input_shape = check_shape4("input_shape", input_shape)
    size = check_int("size", size, 1)
    stride = check_int("stride", stride, 1)
    n, c, h, w = input_shape
    oh, ow = pool_output_size(h, w, size, stride)
    if dy.shape != (n, c, oh, ow):
        raise ValueError(f"dy must have shape {(n, c, oh, ow)}, got {dy.shape}")
    return input_shape, size, stride


def check_global_avgpool_backward(dy, input_shape):
    check_array("dy", dy, 2)
    input_shape = check_shape4("input_shape", input_shape)
    if dy.shape != input_shape[:2]:
        raise ValueError(f"dy must have shape {input_shape[:2]} (N, C), got {dy.shape}")
    return input_shape


def check_add(a, b):
    check_array("a", a)
    check_array("b", b, a.ndim, a.dtype)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")


def argmax_range_error(h, w, outside):
    return ValueError(f"argmax values must lie in [0, {h * w}) for {h}x{w} planes: "
                      f"{outside} do not")


def check_argmax_range(argmax, h, w):
    """An argmax outside its h x w plane is an error, not a write somewhere else."""
    outside = np.count_nonzero((argmax < 0) | (argmax >= h * w))
    if outside:
        raise argmax_range_error(h, w, outside)


def check_relu_backward(dy, y):
    check_array("dy", dy)
    if not isinstance(y, np.ndarray) or y.shape != dy.shape:
        got = getattr(y, "shape", type(y).__name__)
        raise ValueError(f"y must be an array shaped like dy {dy.shape}, got {got}")
    check_array("y", y, dtype=dy.dtype)


def check_dense_forward(x, w, b):
    check_array("x", x, 2)
    check_array("w", w, 2, x.dtype)
    check_array("b", b, 1, x.dtype)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w {w.shape} expects {w.shape[1]} input features, x has {x.shape[1]}")
    if b.shape != (w.shape[0],):
        raise ValueError(f"b must have shape ({w.shape[0]},), got {b.shape}")


def check_dense_backward(dy, x, w):
    check_array("dy", dy, 2)
    check_array("x", x, 2, dy.dtype)
    check_array("w", w, 2, dy.dtype)
    if x.shape[1] != w.shape[1] or dy.shape != (x.shape[0], w.shape[0]):
        raise ValueError(
            f"shapes do not match a dense layer: dy {dy.shape}, x {x.shape}, w {w.shape}"
        )


def check_sgd_update(param, grad, lr):
    check_array("param", param)
    check_array("grad", grad, param.ndim, param.dtype)
    if grad.shape != param.shape:
        raise ValueError(f"grad {grad.shape} does not match param {param.shape}")
    if not param.flags.c_contiguous or not param.flags.writeable:
        raise ValueError("param must be a writeable C-contiguous array (it is updated in place)")
    check_scalar("lr", lr)


def check_scalar(name, value, minimum=None, below=None, positive=False, maximum=None):
    """A real number (Python or NumPy scalar, not bool), finite, > 0 if ``positive``, >=
    ``minimum``, < ``below`` and <= ``maximum`` where given -> float; else a ValueError naming
    it."""
    kind = "positive finite" if positive else "finite"
    if isinstance(value, (bool, np.bool_)) or not (
            isinstance(value, (int, float, np.integer, np.floating)) and np.isfinite(value)) or (
            positive and value <= 0):
        raise ValueError(f"{name} must be a {kind} number, got {value!r}")
    if (minimum is not None and value < minimum) or (below is not None and value >= below) or (
            maximum is not None and value > maximum):
        top = f"{below})" if below is not None else f"{maximum}]"
        if minimum is not None and (below, maximum) != (None, None):
            bounds = f"in [{minimum}, {top}"
        elif minimum is not None:
            bounds = f">= {minimum}"
        else:
            bounds = f"< {below}" if below is not None else f"<= {maximum}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return float(value)


def check_optimizer_update(param, grad, states):
    """param and every state array: writeable, C-contiguous, grad's shape and dtype."""
    check_sgd_update(param, grad, 1.0)
    for name, a in states.items():
        check_array(name, a, param.ndim, param.dtype)
        if a.shape != param.shape:
            raise ValueError(f"{name} {a.shape} does not match param {param.shape}")
        if not a.flags.c_contiguous or not a.flags.writeable:
            raise ValueError(f"{name} must be a writeable C-contiguous array (updated in place)")


def check_sgd_momentum_update(param, grad, velocity, lr, momentum, weight_decay):
    check_optimizer_update(param, grad, {"velocity": velocity})
    return (check_scalar("lr", lr), check_scalar("momentum", momentum, 0.0),
            check_scalar("weight_decay", weight_decay, 0.0))


def check_adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    check_optimizer_update(param, grad, {"m": m, "v": v})
    step = check_int("step", step, 1)
    return (check_scalar("lr", lr), check_scalar("beta1", beta1, 0.0, 1.0),
            check_scalar("beta2", beta2, 0.0, 1.0), check_scalar("eps", eps, positive=True),
            check_scalar("weight_decay", weight_decay, 0.0), step)


def check_softmax_cross_entropy(logits, labels):
    check_array("logits", logits, 2)
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        raise TypeError("labels must be an integer numpy array")
    n, k = logits.shape
    if n == 0:
        raise ValueError("logits has no rows: the mean loss of an empty batch is undefined")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match logits {logits.shape}, "
                         f"got {labels.shape}")
    if (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}), got values from {labels.min()} "
                         f"to {labels.max()}")


def check_dropout(x, keep, scale):
    check_array("x", x)
    if not isinstance(keep, np.ndarray) or keep.dtype != np.bool_ or keep.shape != x.shape:
        got = (f"{keep.dtype} {keep.shape}" if isinstance(keep, np.ndarray)
               else type(keep).__name__)
        raise ValueError(f"keep must be a bool array shaped like x {x.shape}, got {got}")
    return check_scalar("scale", scale, 0.0)


def _check_channels(name, a, c, dtype):
    check_array(name, a, 1, dtype)
    if a.shape != (c,):
        raise ValueError(f"{name} must have shape ({c},) for {c} channels, got {a.shape}")


def check_batchnorm(x, gamma, beta, eps, stats=()):
    """x (N, C, L) with N * L >= 1, per-channel arrays of shape (C,), eps > 0."""
    check_array("x", x, 3)
    n, c, length = x.shape
    if n * length == 0 or c == 0:
        raise ValueError(f"batch normalization needs at least one value per channel, got x "
                         f"{x.shape}")
    for name, a in (("gamma", gamma), ("beta", beta), *stats):
        _check_channels(name, a, c, x.dtype)
    return check_scalar("eps", eps, positive=True)


def check_batchnorm_backward(dy, x, gamma, mean, var, eps):
    eps = check_batchnorm(x, gamma, gamma, eps, (("mean", mean), ("var", var)))
    check_array("dy", dy, 3, x.dtype)
    if dy.shape != x.shape:
        raise ValueError(f"dy {dy.shape} does not match x {x.shape}")
    return eps
