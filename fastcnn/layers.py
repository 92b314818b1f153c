"""Layers and the loss. Each one only dispatches to the active kernel backend.

Every layer has ``forward(x)`` and ``backward(dy) -> dx``; a layer with parameters keeps them in
``params`` and their gradients in ``grads`` (same keys, same shapes). ``output_shape(shape)`` maps a
per-sample input shape (no batch axis) to the output's and raises ValueError on a mismatch, which
is how ``ConvNet`` finds a wrong layer when it is built instead of in the middle of training.
"""

from __future__ import annotations

import numpy as np

from .backend import kernels
from .kernels import _contract


def _rng(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _float_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in _contract.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _he_normal(rng, shape, fan_in, dtype):
    # He initialisation keeps the activation variance steady through ReLU layers.
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


def resolve_padding(padding, kernel_size):
    """'valid' -> 0, 'same' -> (k - 1) // 2 for an odd square kernel, an int -> itself."""
    kh, kw = kernel_size
    if padding == "valid":
        return 0
    if padding == "same":
        if kh != kw or kh % 2 == 0:
            raise ValueError(
                f"padding='same' needs an odd square kernel (symmetric padding), got {kh}x{kw}"
            )
        return (kh - 1) // 2
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool) and padding >= 0:
        return int(padding)
    raise ValueError(f"padding must be 'same', 'valid' or an int >= 0, got {padding!r}")


class Layer:
    """Base class: no parameters, shape unchanged."""

    params: dict
    grads: dict
    buffers: dict  # state saved with the model but not trained (BatchNorm's running statistics)
    training: bool  # training mode (see ConvNet.train / ConvNet.eval)

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self.training = True

    def output_shape(self, shape):
        return tuple(shape)

    def min_batch_size(self, shape):
        """The fewest images a training batch of per-sample inputs ``shape`` can hold."""
        return 1

    @classmethod
    def param_specs(cls, **config):
        """{key: (shape, dtype)} of the parameters a layer built from ``config`` would have,
        computed without allocating them (model files are checked against this first)."""
        return {}

    @classmethod
    def buffer_specs(cls, **config):
        """{key: (shape, dtype)} of the buffers, likewise."""
        return {}

    def config(self):
        """Constructor arguments, JSON-serialisable, for ``ConvNet.save``."""
        return {}

    def children(self):
        """The layers this one holds, as ``(name, layer)`` (containers only)."""
        return ()

    def flops(self, shape):
        """Multiply-adds x 2 per image of per-sample input ``shape`` (0: negligible)."""
        return 0

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "dtype")
        return f"{type(self).__name__}({args})"


class Conv2D(Layer):
    """2-D convolution, NCHW: (N, C, H, W) -> (N, F, OH, OW). Weight (F, C, KH, KW), bias (F,)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding="same",
                 dtype=np.float32, rng=None):
        super().__init__()
        specs = self.param_specs(in_channels, out_channels, kernel_size, stride, padding, dtype)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _contract.pair("kernel_size", kernel_size)
        self.stride = int(stride)
        self.padding = padding
        self.pad = resolve_padding(padding, self.kernel_size)
        kh, kw = self.kernel_size
        shape, dtype = specs["weight"]
        self.params["weight"] = _he_normal(_rng(rng), shape, self.in_channels * kh * kw, dtype)
        self.params["bias"] = np.zeros(*specs["bias"])
        self._x = None

    @classmethod
    def param_specs(cls, in_channels, out_channels, kernel_size, stride=1, padding="same",
                    dtype=np.float32):
        f = _contract.check_int("out_channels", out_channels, 1)
        c = _contract.check_int("in_channels", in_channels, 1)
        kh, kw = _contract.pair("kernel_size", kernel_size)
        _contract.check_int("stride", stride, 1)
        resolve_padding(padding, (kh, kw))
        dtype = _float_dtype(dtype)
        return {"weight": ((f, c, kh, kw), dtype), "bias": ((f,), dtype)}

    def output_shape(self, shape):
        if len(shape) != 3 or shape[0] != self.in_channels:
            raise ValueError(
                f"{self!r} expects input (C={self.in_channels}, H, W), got {tuple(shape)}"
            )
        oh, ow = _contract.conv_output_size(shape[1], shape[2], *self.kernel_size,
                                            self.stride, self.pad)
        return (self.out_channels, oh, ow)

    def flops(self, shape):
        _, oh, ow = self.output_shape(shape)
        kh, kw = self.kernel_size
        return 2 * self.out_channels * self.in_channels * kh * kw * oh * ow

    def forward(self, x, relu=False):
        """y; with relu, the ReLU of y: the ReLU layer after this one fused in (ConvNet does
        so where the backend has the contract's "conv2d_relu" kernels; that layer then passes
        the gradient through, and this layer's backward applies its mask)."""
        # _saved: (kernel module, what its forward kept); _relu_y: the fused ReLU's output
        self._x, self._saved, self._relu_y = x, None, None
        k, w, b = kernels(), self.params["weight"], self.params["bias"]
        if relu:
            y, kept = k.conv2d_relu_forward(x, w, b, self.stride, self.pad)
            if self.training:
                self._saved, self._relu_y = (k, kept), y
            return y
        if self.training and _contract.has(k, "conv2d_saved_layout"):  # x laid out once
            y, kept = k.conv2d_forward_saving(x, w, b, self.stride, self.pad)
            self._saved = (k, kept)
            return y
        return k.conv2d_forward(x, w, b, self.stride, self.pad)

    def backward(self, dy, need_dx=True):
        k = kernels()
        if self._relu_y is not None:  # dy arrives at the fused ReLU
            (by, saved), relu_y = self._saved, self._relu_y
            self._saved = self._relu_y = None
            if by is k:
                self.grads["weight"], self.grads["bias"], dx = k.conv2d_relu_backward(
                    self._x, dy, relu_y, self.params["weight"], self.stride, self.pad, need_dx,
                    saved)
                return dx
            dy = k.relu_backward(dy, relu_y)  # the backend changed in between: unfused
        if _contract.has(k, "conv2d_saved_layout"):
            by, saved = self._saved or (None, None)
            self._saved = None  # one backward pass per forward: free it
            saved = saved if by is k else None  # (the backend changed in between: not ours)
            self.grads["weight"], self.grads["bias"], dx = k.conv2d_backward(
                self._x, dy, self.params["weight"], self.stride, self.pad, need_dx, saved)
            return dx
        self.grads["weight"], self.grads["bias"] = k.conv2d_grad_weight(
            self._x, dy, self.kernel_size, self.stride, self.pad)
        if not need_dx:
            return None
        return k.conv2d_grad_input(dy, self.params["weight"], self._x.shape, self.stride, self.pad)

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding, "dtype": self.params["weight"].dtype.name}


class ReLU(Layer):
    """max(x, 0), any shape."""

    def forward(self, x):
        self._fused = False
        self._y = kernels().relu_forward(x)
        return self._y

    def fused(self, y):
        """The convolution before this layer applied it (Conv2D.forward(x, relu=True)) and gave
        y: the backward pass then leaves the mask to that layer's backward."""
        self._fused, self._y = True, y
        return y

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        return dy if self._fused else kernels().relu_backward(dy, self._y)


class _Pool2D(Layer):
    """Pooling over pool_size x pool_size windows (stride defaults to pool_size), NCHW."""

    def __init__(self, pool_size=2, stride=None):
        super().__init__()
        self.pool_size = _contract.check_int("pool_size", pool_size, 1)
        self.stride = self.pool_size if stride is None else _contract.check_int("stride", stride, 1)

    def output_shape(self, shape):
        if len(shape) != 3:
            raise ValueError(f"{self!r} expects input (C, H, W), got {tuple(shape)}")
        oh, ow = _contract.pool_output_size(shape[1], shape[2], self.pool_size, self.stride)
        return (shape[0], oh, ow)

    def config(self):
        return {"pool_size": self.pool_size, "stride": self.stride}


class MaxPool2D(_Pool2D):
    """Max pooling over pool_size x pool_size windows (stride defaults to pool_size), NCHW."""

    def forward(self, x):
        self._shape = x.shape
        # inference mode keeps no argmax: nothing will be backpropagated
        y, self._argmax = kernels().maxpool2d_forward(x, self.pool_size, self.stride,
                                                      with_argmax=self.training)
        return y

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        if self._argmax is None:
            raise RuntimeError(f"{self!r}: backward after a forward pass in inference mode, "
                               "which keeps no argmax; call the network's train() first")
        return kernels().maxpool2d_backward(dy, self._argmax, self._shape, self.pool_size,
                                            self.stride)


class AvgPool2D(_Pool2D):
    """Average pooling over pool_size x pool_size windows (stride defaults to pool_size), NCHW."""

    def forward(self, x):
        self._shape = x.shape
        return kernels().avgpool2d_forward(x, self.pool_size, self.stride)

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        return kernels().avgpool2d_backward(dy, self._shape, self.pool_size, self.stride)


class GlobalAvgPool2D(Layer):
    """The mean of every channel's plane: (N, C, H, W) -> (N, C), ready for a Dense layer."""

    def output_shape(self, shape):
        if len(shape) != 3:
            raise ValueError(f"{self!r} expects input (C, H, W), got {tuple(shape)}")
        return (shape[0],)

    def forward(self, x):
        self._shape = x.shape
        return kernels().global_avgpool_forward(x)

    def backward(self, dy, need_dx=True):
        return kernels().global_avgpool_backward(dy, self._shape) if need_dx else None


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W), a view."""

    def output_shape(self, shape):
        return (int(np.prod(shape)),)

    def forward(self, x):
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy, need_dx=True):
        return dy.reshape(self._shape) if need_dx else None


class Dense(Layer):
    """Fully connected: (N, in_features) -> (N, out_features). Weight (out, in), bias (out,)."""

    def __init__(self, in_features, out_features, dtype=np.float32, rng=None):
        super().__init__()
        specs = self.param_specs(in_features, out_features, dtype)
        self.in_features, self.out_features = int(in_features), int(out_features)
        shape, dtype = specs["weight"]
        self.params["weight"] = _he_normal(_rng(rng), shape, self.in_features, dtype)
        self.params["bias"] = np.zeros(*specs["bias"])

    @classmethod
    def param_specs(cls, in_features, out_features, dtype=np.float32):
        n_in = _contract.check_int("in_features", in_features, 1)
        n_out = _contract.check_int("out_features", out_features, 1)
        dtype = _float_dtype(dtype)
        return {"weight": ((n_out, n_in), dtype), "bias": ((n_out,), dtype)}

    def output_shape(self, shape):
        if len(shape) != 1:
            raise ValueError(f"{self!r} needs a flat input, got shape {tuple(shape)}: "
                             f"add Flatten() before it")
        if shape[0] != self.in_features:
            raise ValueError(f"{self!r} does not match its input: the layer before it produces "
                             f"{shape[0]} features, but in_features is {self.in_features}")
        return (self.out_features,)

    def flops(self, shape):
        return 2 * self.in_features * self.out_features

    def forward(self, x):
        self._x = x
        return kernels().dense_forward(x, self.params["weight"], self.params["bias"])

    def backward(self, dy, need_dx=True):
        dx, self.grads["weight"], self.grads["bias"] = kernels().dense_backward(
            dy, self._x, self.params["weight"])
        return dx if need_dx else None

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "dtype": self.params["weight"].dtype.name}


class Dropout(Layer):
    """Inverted dropout: in training mode each value is kept with probability 1 - p and scaled
    by 1 / (1 - p), else zeroed; in inference mode the identity. The mask comes from the layer's
    own generator (``rng``: a seed or a numpy Generator), so every backend trains alike, and a
    checkpoint saves its state."""

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        self.p = _contract.check_scalar("p", p, 0.0, 1.0)  # the probability of a drop
        self.rng = _rng(rng)

    def forward(self, x):
        if not self.training or self.p == 0:
            self._keep = None
            return x
        self._keep = self.rng.random(x.shape, dtype=np.float32) >= self.p
        return kernels().dropout(x, self._keep, 1 / (1 - self.p))

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        if self._keep is None:
            return dy
        return kernels().dropout(dy, self._keep, 1 / (1 - self.p))

    def config(self):
        return {"p": self.p}


class _BatchNorm(Layer):
    """Batch normalization per channel (axis 1): batch statistics in training mode (and running
    averages of them, as torch: momentum 0.1, unbiased variance), the running statistics in
    inference mode. Parameters "weight" (gamma, ones) and "bias" (beta, zeros); buffers
    "running_mean" and "running_var"."""

    ndim = None  # per-sample dimensions: 3 for BatchNorm2D (C, H, W), 1 for BatchNorm1D (C,)

    def __init__(self, channels, eps=1e-5, momentum=0.1, dtype=np.float32):
        super().__init__()
        specs = self.param_specs(channels, eps, momentum, dtype)
        self.channels = int(channels)
        self.eps = float(eps)
        self.momentum = float(momentum)
        (shape, dtype) = specs["weight"]
        self.params["weight"] = np.ones(shape, dtype)
        self.params["bias"] = np.zeros(shape, dtype)
        self.buffers["running_mean"] = np.zeros(shape, dtype)
        self.buffers["running_var"] = np.ones(shape, dtype)

    @classmethod
    def param_specs(cls, channels, eps=1e-5, momentum=0.1, dtype=np.float32):
        c = _contract.check_int("channels", channels, 1)
        _contract.check_scalar("eps", eps, below=1.0, positive=True)
        _contract.check_scalar("momentum", momentum, 0.0, maximum=1.0)
        dtype = _float_dtype(dtype)
        return {"weight": ((c,), dtype), "bias": ((c,), dtype)}

    @classmethod
    def buffer_specs(cls, channels, eps=1e-5, momentum=0.1, dtype=np.float32):
        specs = cls.param_specs(channels, eps, momentum, dtype)
        return {"running_mean": specs["weight"], "running_var": specs["weight"]}

    def output_shape(self, shape):
        if len(shape) != self.ndim or shape[0] != self.channels:
            want = "(C, H, W)" if self.ndim == 3 else "(C,)"
            raise ValueError(f"{self!r} expects input {want} with C={self.channels}, got "
                             f"{tuple(shape)}")
        return tuple(shape)

    def min_batch_size(self, shape):
        # the batch's statistics need two values per channel: two images when each holds one
        return 2 if int(np.prod(shape[1:])) == 1 else 1

    def forward(self, x):
        self._shape = x.shape
        x3 = x.reshape(x.shape[0], self.channels, -1)
        gamma, beta = self.params["weight"], self.params["bias"]
        k = kernels()
        if not self.training:
            self._x3 = None
            return k.batchnorm_inference(x3, gamma, beta, self.buffers["running_mean"],
                                         self.buffers["running_var"], self.eps).reshape(x.shape)
        m = x3.shape[0] * x3.shape[2]
        if m < 2:
            raise ValueError(f"{self!r} needs more than one value per channel in training mode, "
                             f"got input {tuple(x.shape)} (a batch of one: use a larger batch)")
        y, mean, var = k.batchnorm_forward(x3, gamma, beta, self.eps)
        self._x3, self._mean, self._var = x3, mean, var
        unbiased = var * (m / (m - 1))
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        rm *= 1 - self.momentum
        rm += self.momentum * mean
        rv *= 1 - self.momentum
        rv += self.momentum * unbiased
        return y.reshape(x.shape)

    def backward(self, dy, need_dx=True):
        if self._x3 is None:
            raise RuntimeError(f"{self!r}: backward after a forward pass in inference mode "
                               f"(train with net.train())")
        dx, self.grads["weight"], self.grads["bias"] = kernels().batchnorm_backward(
            dy.reshape(self._x3.shape), self._x3, self.params["weight"], self._mean, self._var,
            self.eps)
        return dx.reshape(self._shape) if need_dx else None

    def config(self):
        return {"channels": self.channels, "eps": self.eps, "momentum": self.momentum,
                "dtype": self.params["weight"].dtype.name}


class BatchNorm2D(_BatchNorm):
    """Batch normalization of (N, C, H, W): statistics per channel over N, H and W."""

    ndim = 3


class BatchNorm1D(_BatchNorm):
    """Batch normalization of (N, C), as after a Dense layer: statistics per feature over N."""

    ndim = 1


# -- running a chain of layers, and layers that hold layers ------------------------------------

MAX_DEPTH = 32  # containers inside containers, at most (model files are checked against it)


def forward_chain(layers, x):
    """x through ``layers`` in order. Two layers can run as one: a convolution and the ReLU
    after it, where the backend has the contract's "conv2d_relu" kernels (the ReLU applied as
    the convolution stores its outputs, its mask where the backward lays out dy: the same
    numbers, one pass over the activations fewer each way). In inference, a ReLU followed by
    max pooling runs after it instead, on a quarter of the values (for 2x2 pooling): max and
    ReLU commute exactly, NaN included (both keep it), and nothing is kept for a backward."""
    fuse = _contract.has(kernels(), "conv2d_relu")
    i = 0
    while i < len(layers):
        layer, after = layers[i], layers[i + 1] if i + 1 < len(layers) else None
        if fuse and type(layer) is Conv2D and type(after) is ReLU:
            x = after.fused(layer.forward(x, relu=True))
            i += 2
        elif (type(layer) is ReLU and not layer.training
                and type(after) is MaxPool2D and not after.training):
            x = layer.forward(after.forward(x))
            i += 2
        else:
            x = layer.forward(x)
            i += 1
    return x


def backward_chain(layers, dy, need_dx=True):
    """dy back through ``layers``: every layer's grads; the first layer's input gradient only
    if ``need_dx`` (the network's first layer skips it: nobody needs it)."""
    for i in range(len(layers) - 1, -1, -1):
        dy = layers[i].backward(dy, need_dx=need_dx or i > 0)
    return dy


def build_layer(spec, depth=0):
    """A layer from ``{"type": name, "config": {...}}`` (what ``layer_spec`` gives), or the
    layer itself; ValueError/TypeError name what is wrong."""
    if isinstance(spec, Layer):
        return spec
    layer_type, config = _spec_parts(spec, depth)
    return layer_type(**config)


def layer_spec(layer):
    """``{"type": ..., "config": ...}``: what a model file records of a layer (nested for
    containers), and what ``build_layer`` builds again."""
    return {"type": type(layer).__name__, "config": layer.config()}


def _spec_parts(spec, depth):
    if depth > MAX_DEPTH:
        raise ValueError(f"layers are nested more than {MAX_DEPTH} deep")
    if not isinstance(spec, dict):
        raise TypeError(f"a layer must be a fastcnn Layer or a spec dict, got "
                        f"{type(spec).__name__}")
    name = spec.get("type")
    layer_type = LAYER_TYPES.get(name) if isinstance(name, str) else None
    if layer_type is None:
        raise ValueError(f"unknown layer type {str(name)[:40]!r}; register your own with "
                         f"fastcnn.layers.register")
    config = spec.get("config", {})
    if not isinstance(config, dict):
        raise TypeError(f"{name}'s config must be an object, got {type(config).__name__}")
    if issubclass(layer_type, Container):
        config = {**config, "_depth": depth + 1}
    return layer_type, config


def specs_of(spec, depth=0):
    """{key: (shape, dtype)} of the parameters and buffers a layer spec would have (keys
    dotted inside containers), computed without building anything."""
    layer_type, config = _spec_parts(spec, depth)
    return {**layer_type.param_specs(**config), **layer_type.buffer_specs(**config)}


class Container(Layer):
    """A layer that holds layers. Its ``params``, ``grads`` and ``buffers`` are its children's,
    keyed ``<child>.<key>`` (the same arrays: an optimizer updates them in place), and its mode
    is theirs, so everything that walks a network's layers walks the tree."""

    def __init__(self):  # noqa: D107 - no params of its own: the properties below
        self._training = True

    def children(self):
        raise NotImplementedError

    def _gather(self, what):
        return {f"{name}.{key}": a for name, child in self.children()
                for key, a in getattr(child, what).items()}

    @property
    def params(self):
        return self._gather("params")

    @property
    def grads(self):
        return self._gather("grads")

    @property
    def buffers(self):
        return self._gather("buffers")

    @property
    def training(self):
        return self._training

    @training.setter
    def training(self, mode):
        self._training = bool(mode)
        for _, child in self.children():
            child.training = bool(mode)

    @staticmethod
    def _child_specs(prefix, spec, depth, which):
        layer_type, config = _spec_parts(spec, depth)
        found = getattr(layer_type, which)(**config)
        return {f"{prefix}.{key}": value for key, value in found.items()}


def _built(layers, what, depth):
    if isinstance(layers, Layer) or not isinstance(layers, (list, tuple)):
        raise TypeError(f"{what} must be a list of layers, got {type(layers).__name__}")
    built = []
    for i, item in enumerate(layers):
        if isinstance(item, dict):
            item = build_layer(item, depth)
        if not isinstance(item, Layer):
            raise TypeError(f"{what}[{i}] must be a fastcnn layer, got {type(item).__name__}")
        built.append(item)
    return built


class Sequential(Container):
    """Layers run one after another, as one layer: ``Sequential([Conv2D(...), BatchNorm2D(...),
    ReLU()])``. Children are named by position ("0", "1", ...)."""

    def __init__(self, layers, _depth=0):
        super().__init__()
        self.layers = _built(layers, "Sequential's layers", _depth)
        if not self.layers:
            raise ValueError("Sequential needs at least one layer")

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    @classmethod
    def _specs(cls, which, layers, _depth=0):
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError("Sequential's layers must be a non-empty list")
        out = {}
        for i, spec in enumerate(layers):
            out.update(cls._child_specs(str(i), spec, _depth, which))
        return out

    @classmethod
    def param_specs(cls, layers, _depth=0):
        return cls._specs("param_specs", layers, _depth)

    @classmethod
    def buffer_specs(cls, layers, _depth=0):
        return cls._specs("buffer_specs", layers, _depth)

    def output_shape(self, shape):
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.output_shape(shape)
            except ValueError as e:
                raise ValueError(f"in Sequential, layer {i} ({type(layer).__name__}): {e}") \
                    from None
        return tuple(shape)

    def min_batch_size(self, shape):
        most = 1
        for layer in self.layers:
            most = max(most, layer.min_batch_size(shape))
            shape = layer.output_shape(shape)
        return most

    def flops(self, shape):
        total = 0
        for layer in self.layers:
            total += layer.flops(shape)
            shape = layer.output_shape(shape)
        return total

    def forward(self, x):
        return forward_chain(self.layers, x)

    def backward(self, dy, need_dx=True):
        return backward_chain(self.layers, dy, need_dx)

    def config(self):
        return {"layers": [layer_spec(layer) for layer in self.layers]}

    def __repr__(self):
        return f"Sequential({len(self.layers)} layers)"


class Residual(Container):
    """y = block(x) + shortcut(x): a skip connection. ``shortcut`` None is the identity (the
    block must keep the shape); else a layer such as ``Sequential([Conv2D(c, f, 1, stride=2,
    padding=0), BatchNorm2D(f)])`` that gives the block's output shape. Backward, dy goes to
    both branches and their input gradients add up."""

    def __init__(self, block, shortcut=None, _depth=0):
        super().__init__()
        self.block = _built([block], "Residual's block", _depth)[0]
        self.shortcut = None if shortcut is None else _built([shortcut], "Residual's shortcut",
                                                             _depth)[0]

    def children(self):
        kids = [("block", self.block)]
        return kids if self.shortcut is None else [*kids, ("shortcut", self.shortcut)]

    @classmethod
    def _specs(cls, which, block, shortcut=None, _depth=0):
        out = cls._child_specs("block", block, _depth, which)
        if shortcut is not None:
            out.update(cls._child_specs("shortcut", shortcut, _depth, which))
        return out

    @classmethod
    def param_specs(cls, block, shortcut=None, _depth=0):
        return cls._specs("param_specs", block, shortcut, _depth)

    @classmethod
    def buffer_specs(cls, block, shortcut=None, _depth=0):
        return cls._specs("buffer_specs", block, shortcut, _depth)

    def output_shape(self, shape):
        try:
            out = self.block.output_shape(shape)
        except ValueError as e:
            raise ValueError(f"in Residual's block: {e}") from None
        if self.shortcut is None:
            if tuple(out) != tuple(shape):
                raise ValueError(f"Residual's block turns {tuple(shape)} into {tuple(out)}; an "
                                 f"identity shortcut needs the same shape (give a shortcut, "
                                 f"e.g. a strided 1x1 Conv2D)")
            return tuple(out)
        try:
            side = self.shortcut.output_shape(shape)
        except ValueError as e:
            raise ValueError(f"in Residual's shortcut: {e}") from None
        if tuple(side) != tuple(out):
            raise ValueError(f"Residual's block gives {tuple(out)} but its shortcut gives "
                             f"{tuple(side)}: they must match to be added")
        return tuple(out)

    def min_batch_size(self, shape):
        side = 1 if self.shortcut is None else self.shortcut.min_batch_size(shape)
        return max(self.block.min_batch_size(shape), side)

    def flops(self, shape):
        out = self.output_shape(shape)
        side = 0 if self.shortcut is None else self.shortcut.flops(shape)
        return self.block.flops(shape) + side + int(np.prod(out))  # the add

    def forward(self, x):
        y = self.block.forward(x)
        return kernels().add(y, x if self.shortcut is None else self.shortcut.forward(x))

    def backward(self, dy, need_dx=True):
        dx = self.block.backward(dy, need_dx)
        side = dy if self.shortcut is None else self.shortcut.backward(dy, need_dx)
        return kernels().add(dx, side) if need_dx else None

    def config(self):
        return {"block": layer_spec(self.block),
                "shortcut": None if self.shortcut is None else layer_spec(self.shortcut)}

    def __repr__(self):
        return "Residual(identity)" if self.shortcut is None else "Residual(projection)"


def register(layer_type):
    """Make a custom ``Layer`` subclass known by its class name, so that models holding it
    save and load (``ConvNet.load`` builds layers by the name a file records). Use as a
    decorator. Its ``config()`` must return its constructor's keyword arguments (JSON), and
    ``param_specs``/``buffer_specs`` the arrays that config gives."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, Layer)):
        raise TypeError(f"register takes a Layer subclass, got {layer_type!r}")
    name = layer_type.__name__
    known = LAYER_TYPES.get(name)
    if known is not None and known is not layer_type:
        raise ValueError(f"a layer type named {name!r} is already registered ({known!r})")
    LAYER_TYPES[name] = layer_type
    return layer_type


class SoftmaxCrossEntropy:
    """Softmax followed by cross-entropy, averaged over the batch."""

    def forward(self, logits, labels):
        """Return the mean loss (a float) and keep its gradient for ``backward``."""
        loss, self._dlogits = kernels().softmax_cross_entropy(logits, labels)
        return loss

    def backward(self):
        """d(mean loss)/d(logits), shape (N, K)."""
        return self._dlogits


LAYER_TYPES = {cls.__name__: cls for cls in (Conv2D, ReLU, MaxPool2D, AvgPool2D, GlobalAvgPool2D,
                                              Flatten, Dense, Dropout, BatchNorm2D, BatchNorm1D,
                                              Sequential, Residual)}
