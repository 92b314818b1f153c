"""One training engine in a process of its own, timed on command by ``fastcnn bench``.

Each engine (a fastcnn backend, or PyTorch) runs in its own process so that thread runtimes never
share one: Numba's OpenMP pool, OpenBLAS's and PyTorch's own OpenMP build spinning on the same
cores stall each other. The parent starts every engine of one configuration, then asks them in
turn to run a number of batches, so that drift on a shared machine hits all of them alike.

Protocol, one JSON object per line: the worker prints ``{"ready": ..., "first_batch_s": ...}``
once warm, then answers ``train N``, ``infer N`` (N batches) with ``{"seconds", "images"}``,
``stats`` with ``{"peak_rss_mb"}``; ``quit`` ends it.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

TORCH = "torch"


class FastcnnEngine:
    def __init__(self, backend, model, batch_size, threads, lr=0.05, seed=0):
        import fastcnn
        from fastcnn import models
        from fastcnn import threads as thread_count

        fastcnn.set_backend(backend)
        if threads:
            fastcnn.set_num_threads(threads)
        # as in ConvNet.fit: unless --threads fixed it, the count is tuned as batches run
        self.tuners = {k: thread_count.Tuner(enabled=backend == "numba")
                       for k in ("train", "infer")}
        self.net = models.build(model, seed=seed)
        self.opt = fastcnn.SGD(lr)
        self.buf = np.empty((batch_size, 1, 28, 28), np.float32)

    def _scale(self, x):
        # The same uint8 -> float32 / 255 conversion as ConvNet.fit, into a reused buffer.
        return np.multiply(x, np.float32(1 / 255), out=self.buf[: len(x)])

    def train(self, x, y):
        self.tuners["train"].start()
        self.net.train_step(self._scale(x), y, self.opt)
        self.tuners["train"].stop(len(x))

    def infer(self, x):
        self.tuners["infer"].start()
        out = self.net.forward(self._scale(x)).argmax(axis=1)
        self.tuners["infer"].stop(len(x))
        return out

    def threads_used(self, what):
        return self.tuners[what].most_used()


def torch_model(name, input_shape=(1, 28, 28), classes=10):
    """The fastcnn model ``name`` built in PyTorch, layer for layer (its own initial weights:
    ``copy_weights`` gives it fastcnn's)."""
    from . import models

    return torch_twin(models.build(name, input_shape=input_shape, classes=classes))


def torch_twin(net_or_layer):
    """A PyTorch module with the architecture of a fastcnn ``ConvNet`` or layer, containers
    included (a ``Residual`` becomes a module computing block(x) + shortcut(x)). Its modules
    with parameters come in the order of ``ConvNet.walk()``, as ``copy_weights`` expects."""
    from torch import nn

    from . import layers as L

    class Residual(nn.Module):
        def __init__(self, block, shortcut):
            super().__init__()
            self.block, self.shortcut = block, shortcut

        def forward(self, x):
            return self.block(x) + (x if self.shortcut is None else self.shortcut(x))

    def twin(layer):
        kind = type(layer)
        if kind is L.Conv2D:
            return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                             layer.stride, layer.pad)
        if kind in (L.BatchNorm2D, L.BatchNorm1D):
            norm = nn.BatchNorm2d if kind is L.BatchNorm2D else nn.BatchNorm1d
            return norm(layer.channels, eps=layer.eps, momentum=layer.momentum)
        if kind is L.Dense:
            return nn.Linear(layer.in_features, layer.out_features)
        if kind in (L.MaxPool2D, L.AvgPool2D):
            pool = nn.MaxPool2d if kind is L.MaxPool2D else nn.AvgPool2d
            return pool(layer.pool_size, layer.stride)
        if kind is L.GlobalAvgPool2D:
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        simple = {L.ReLU: nn.ReLU, L.Flatten: nn.Flatten}
        if kind in simple:
            return simple[kind]()
        if kind is L.Dropout:
            return nn.Dropout(layer.p)
        if kind is L.Sequential:
            return nn.Sequential(*map(twin, layer.layers))
        if kind is L.Residual:
            return Residual(twin(layer.block),
                            None if layer.shortcut is None else twin(layer.shortcut))
        raise ValueError(f"no PyTorch twin for fastcnn layer {kind.__name__}")

    if isinstance(net_or_layer, L.Layer):
        return twin(net_or_layer)
    return nn.Sequential(*map(twin, net_or_layer.layers))  # a ConvNet


def copy_weights(net, tnet):
    """fastcnn's parameters and buffers into a PyTorch twin (``torch_model``, ``torch_twin``),
    layer for layer in the order of ``net.walk()``, so that both start from the same weights."""
    import torch

    ours = [layer for _, layer in net.walk() if layer.params and not layer.children()]
    theirs = [m for m in tnet.modules() if any(True for _ in m.parameters(recurse=False))]
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} fastcnn layers with parameters, {len(theirs)} in torch")
    with torch.no_grad():
        for layer, module in zip(ours, theirs, strict=True):
            module.weight.copy_(torch.from_numpy(layer.params["weight"]))
            module.bias.copy_(torch.from_numpy(layer.params["bias"]))
            for key, b in layer.buffers.items():
                getattr(module, key).copy_(torch.from_numpy(b))


class TorchEngine:
    """PyTorch CPU on the same architecture, loss (mean cross-entropy) and plain SGD."""

    def __init__(self, model, batch_size, threads, lr=0.05, seed=0):
        import torch

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.net = torch_model(model)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=lr)
        self.loss = torch.nn.CrossEntropyLoss()

    def _scale(self, x):
        return self.torch.from_numpy(x).float().div_(255)

    def train(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.net(self._scale(x)), self.torch.from_numpy(y)).backward()
        self.opt.step()

    def infer(self, x):
        with self.torch.inference_mode():
            return self.net(self._scale(x)).argmax(dim=1)


def make_engine(engine, model, batch_size, threads):
    if engine == TORCH:
        return TorchEngine(model, batch_size, threads)
    return FastcnnEngine(engine, model, batch_size, threads)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def serve(engine, model, batch_size, threads, warmup=True):
    from fastcnn import datasets

    (x, y), _ = datasets.load("mnist-sample", raw=True)
    x, y = np.ascontiguousarray(x), y.astype(np.int64)
    starts = range(0, len(x) - batch_size + 1, batch_size)
    batches = [(x[s : s + batch_size], y[s : s + batch_size]) for s in starts]
    if not batches:
        raise ValueError(f"batch size {batch_size} exceeds the {len(x)} sample images")
    t0 = time.perf_counter()
    runner = make_engine(engine, model, batch_size, threads)
    first = None
    if warmup:  # the first batch pays for compiling (numba) or allocating (torch)
        start = time.perf_counter()
        runner.train(*batches[0])
        runner.infer(batches[0][0])
        first = time.perf_counter() - start
    reply({"ready": True, "setup_s": time.perf_counter() - t0, "first_batch_s": first})
    cursor = 0
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        if words[0] == "stats":
            reply({"peak_rss_mb": peak_rss_mb()})
            continue
        count = int(words[1])
        start = time.perf_counter()
        for _ in range(count):
            xb, yb = batches[cursor % len(batches)]
            cursor += 1
            if words[0] == "train":
                runner.train(xb, yb)
            else:
                runner.infer(xb)
        used = getattr(runner, "threads_used", None)
        reply({"seconds": time.perf_counter() - start, "images": count * batch_size,
               "threads": used(words[0]) if used else None})


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engine", help="a fastcnn backend name, or 'torch'")
    p.add_argument("model")
    p.add_argument("batch_size", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--no-warmup", action="store_true")
    args = p.parse_args(argv)
    if args.engine != TORCH:  # what `fastcnn train` does; PyTorch keeps its own allocator
        from fastcnn import memory

        memory.apply_once()
    serve(args.engine, args.model, args.batch_size, args.threads, warmup=not args.no_warmup)


if __name__ == "__main__":
    main()
