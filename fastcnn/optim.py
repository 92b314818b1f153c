"""Optimizers and learning-rate schedules.

An optimizer walks the network's parameters (``ConvNet.parameters()``) and updates each one with
a kernel of the active backend (``sgd_update``, ``sgd_momentum_update``, ``adam_update``), so the
update is one fused pass on ``numba`` and a readable loop on ``naive``. It owns its state
(momentum buffers, Adam's moments, the step count) as arrays keyed like the parameters
(``"layer3.weight"``), which a checkpoint saves and restores.

A schedule maps how far training has come (epochs, or batches, as its ``per`` says) to a factor
of the optimizer's base learning rate; ``fit`` applies it before every step. Each formula is
the closed form of its ``torch.optim.lr_scheduler`` namesake, and the tests compare them.
"""

from __future__ import annotations

import inspect
import math

import numpy as np

from .backend import kernels
from .kernels._contract import check_int, check_scalar


class Optimizer:
    """Base class: ``lr`` (what the schedule scales), per-parameter state, a step count."""

    def __init__(self, lr):
        self.lr = self.base_lr = check_scalar("lr", lr, positive=True)
        self.steps = 0
        self.state: dict[str, dict[str, np.ndarray]] = {}

    def step(self, net):
        """Update every parameter of ``net`` from its gradient (after ``net.backward``)."""
        self.steps += 1
        k = kernels()  # once a step: resolving the backend reads the environment
        for name, param, grad in net.parameters():
            self._update(k, name, param, grad)

    def _update(self, k, name, param, grad):
        raise NotImplementedError

    def state_keys(self):
        """The state arrays kept per parameter (checkpoints save them as
        "<parameter>.<key>")."""
        return ()

    def _buffers(self, name, param, keys):
        """This parameter's state arrays, zeros at first (torch's first step gives the same)."""
        state = self.state.get(name)
        if state is None or any(state[k].shape != param.shape or state[k].dtype != param.dtype
                                for k in keys):
            state = self.state[name] = {k: np.zeros_like(param) for k in keys}
        return [state[k] for k in keys]

    def hyperparameters(self):
        """The constructor's arguments (base learning rate included), JSON-serialisable."""
        raise NotImplementedError

    def state_dict(self):
        """(record, arrays): the type, hyper-parameters and step count as JSON, the state as
        arrays named "<parameter>.<key>"."""
        record = {"type": type(self).__name__, "hyperparameters": self.hyperparameters(),
                  "steps": self.steps, "lr": self.lr}
        arrays = {f"{name}.{key}": a for name, st in self.state.items() for key, a in st.items()}
        return record, arrays

    def load_state_dict(self, record, arrays):
        """Restore what ``state_dict`` gave (on an optimizer built with the same arguments)."""
        if record.get("type") != type(self).__name__:
            raise ValueError(f"the saved optimizer is {record.get('type')!r}, not "
                             f"{type(self).__name__}")
        self.steps = int(record["steps"])
        self.lr = float(record["lr"])
        self.state = {}
        for full, a in arrays.items():
            name, key = full.rsplit(".", 1)
            self.state.setdefault(name, {})[key] = np.array(a)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Mini-batch SGD on the gradient of the mean loss, as torch.optim.SGD (dampening 0).

    With the defaults it is the seed's update, ``p -= lr * grad`` (the ``sgd_update`` kernel);
    ``momentum``, ``nesterov`` and ``weight_decay`` (L2, added to the gradient) use
    ``sgd_momentum_update``.
    """

    def __init__(self, lr=0.05, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(lr)
        self.momentum = check_scalar("momentum", momentum, 0.0, 1.0)
        self.weight_decay = check_scalar("weight_decay", weight_decay, 0.0)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be True or False, got {nesterov!r}")
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs a momentum > 0")

    def state_keys(self):
        return () if self.momentum == 0 and self.weight_decay == 0 else ("velocity",)

    def _update(self, k, name, param, grad):
        if not self.state_keys():
            k.sgd_update(param, grad, self.lr)
            return
        (velocity,) = self._buffers(name, param, ("velocity",))
        k.sgd_momentum_update(param, grad, velocity, self.lr, self.momentum, self.weight_decay,
                              self.nesterov)

    def hyperparameters(self):
        return {"lr": self.base_lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}


class Adam(Optimizer):
    """Adam, as torch.optim.Adam: ``weight_decay`` is L2, added to the gradient."""

    decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (check_scalar("beta1", betas[0], 0.0, 1.0),
                      check_scalar("beta2", betas[1], 0.0, 1.0))
        self.eps = check_scalar("eps", eps, positive=True)  # divides: 0 would give inf
        self.weight_decay = check_scalar("weight_decay", weight_decay, 0.0)

    def state_keys(self):
        return ("m", "v")

    def _update(self, k, name, param, grad):
        m, v = self._buffers(name, param, ("m", "v"))
        k.adam_update(param, grad, m, v, self.lr, self.betas[0], self.betas[1], self.eps,
                      self.weight_decay, self.decoupled, self.steps)

    def hyperparameters(self):
        return {"lr": self.base_lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}


class AdamW(Adam):
    """AdamW, as torch.optim.AdamW: weight decay applied to the weights, apart from the
    gradient (``p *= 1 - lr * weight_decay``)."""

    decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(lr, betas, eps, weight_decay)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def optimizer_from_record(record):
    """An optimizer built from ``state_dict()``'s record (its state is loaded separately)."""
    cls = {c.__name__: c for c in OPTIMIZERS.values()}.get(record.get("type"))
    if cls is None:
        raise ValueError(f"unknown optimizer {record.get('type')!r} (known: "
                         f"{', '.join(c.__name__ for c in OPTIMIZERS.values())})")
    hyper = record.get("hyperparameters")
    takes = list(inspect.signature(cls).parameters)
    if not isinstance(hyper, dict) or set(hyper) - set(takes):
        raise ValueError(f"the hyperparameters of {cls.__name__} are {', '.join(takes)}; got "
                         f"{str(hyper)[:80]}")
    hyper = dict(hyper)
    if isinstance(hyper.get("betas"), list):
        hyper["betas"] = tuple(hyper["betas"])
    return cls(**hyper)


# -- learning-rate schedules ------------------------------------------------------------------


class Schedule:
    """A factor of the base learning rate, from ``t``: epochs (``per="epoch"``) or batches
    (``per="batch"``) completed before the step it is applied to."""

    per = "epoch"

    def __init__(self, per="epoch"):
        if per not in ("epoch", "batch"):
            raise ValueError(f"per must be 'epoch' or 'batch', got {per!r}")
        self.per = per

    def factor(self, t):
        raise NotImplementedError

    def config(self):
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    def factor(self, t):
        return 1.0

    def config(self):
        return {"per": self.per}


class StepDecay(Schedule):
    """``gamma ** (t // step_size)``: torch's StepLR."""

    def __init__(self, step_size, gamma=0.1, per="epoch"):
        super().__init__(per)
        self.step_size = check_int("step_size", step_size, 1)
        self.gamma = check_scalar("gamma", gamma, positive=True)

    def factor(self, t):
        return self.gamma ** (t // self.step_size)

    def config(self):
        return {"step_size": self.step_size, "gamma": self.gamma, "per": self.per}


class Cosine(Schedule):
    """Half a cosine from 1 down to ``min_factor`` over ``total`` epochs or batches, then
    ``min_factor``: torch's CosineAnnealingLR with eta_min = min_factor * base lr up to T_max
    (after which torch's rises again; this one stays at its floor)."""

    def __init__(self, total, min_factor=0.0, per="epoch"):
        super().__init__(per)
        self.total = check_int("total", total, 1)
        self.min_factor = check_scalar("min_factor", min_factor, 0.0)

    def factor(self, t):
        half_cosine = (1 + math.cos(math.pi * min(t, self.total) / self.total)) / 2
        return self.min_factor + (1 - self.min_factor) * half_cosine

    def config(self):
        return {"total": self.total, "min_factor": self.min_factor, "per": self.per}


class LinearWarmup(Schedule):
    """From ``start_factor`` up to 1 in a straight line over ``steps`` epochs or batches, then
    1: torch's LinearLR(start_factor, end_factor=1, total_iters=steps)."""

    def __init__(self, steps, start_factor=0.1, per="batch"):
        super().__init__(per)
        self.steps = check_int("steps", steps, 1)
        # a warm-up rises to the rate (as torch's LinearLR, which refuses a start above 1)
        self.start_factor = check_scalar("start_factor", start_factor, positive=True,
                                         maximum=1.0)

    def factor(self, t):
        return self.start_factor + (1 - self.start_factor) * min(t, self.steps) / self.steps

    def config(self):
        return {"steps": self.steps, "start_factor": self.start_factor, "per": self.per}


class WarmupThen(Schedule):
    """A linear warm-up over its first ``warmup`` steps, then ``then`` counted from the end of
    the warm-up (torch's SequentialLR of LinearLR and the other one). Both count in ``per``."""

    def __init__(self, warmup, then, start_factor=0.1):
        if not isinstance(then, Schedule):
            raise TypeError(f"then must be a fastcnn.optim schedule, e.g. optim.Cosine(100, "
                            f"per='batch'), got {then!r}")
        super().__init__(then.per)
        self.warmup = LinearWarmup(warmup, start_factor, then.per)
        self.then = then

    def factor(self, t):
        if t < self.warmup.steps:
            return self.warmup.factor(t)
        return self.then.factor(t - self.warmup.steps)

    def config(self):
        return {"warmup": self.warmup.steps, "start_factor": self.warmup.start_factor,
                "then": {"type": type(self.then).__name__, **self.then.config()}}


SCHEDULES = {"constant": Constant, "step": StepDecay, "cosine": Cosine, "warmup": LinearWarmup,
             "warmup-then": WarmupThen}


def schedule_from_config(config):
    """A schedule from ``{"type": name, **config()}`` (as checkpoints store it)."""
    config = dict(config)
    kind = config.pop("type", None)
    cls = {c.__name__: c for c in SCHEDULES.values()}.get(kind)
    if cls is None:
        raise ValueError(f"unknown schedule {kind!r}")
    if cls is WarmupThen:
        return WarmupThen(config["warmup"], schedule_from_config(config["then"]),
                          config.get("start_factor", 0.1))
    return cls(**config)
